"""Fixtures shared by the committee tests."""

from __future__ import annotations

import pytest

from tests.committee.test_devnet import running_devnet


@pytest.fixture
def validator(tmp_path):
    """A started one-validator devnet and a client of it: ``(net, client)``; both stopped after."""
    with running_devnet(tmp_path / "devnet", validators=1) as running:
        yield running
