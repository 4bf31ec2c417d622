"""Fixtures for the container runner tests: a tiny busybox root filesystem, and the list of
container runtimes installed here (tests are parametrized over it and skipped when empty).

Needs the Debian packages ``runc``, ``bubblewrap`` and ``busybox-static`` (static, so the
rootfs needs no libraries).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "ls", "sleep", "wget", "touch", "ip", "head", "tr", "true", "id")


def installed_runtimes() -> list[str]:
    """The runtimes these tests can use: runc and/or bwrap found on PATH."""
    return [name for name, exe in (("runc", "runc"), ("bwrap", "bwrap")) if shutil.which(exe)]


@pytest.fixture(params=installed_runtimes() or [None])
def runtime(request) -> str:
    """Each installed runtime in turn; skips when neither runc nor bwrap is installed."""
    if request.param is None:
        pytest.skip("neither runc nor bwrap installed (apt-get install -y runc bubblewrap)")
    return request.param


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory) -> Path:
    """A read-only-friendly rootfs: bin/busybox plus applet symlinks, and mount points."""
    if not BUSYBOX.exists():
        pytest.skip(f"{BUSYBOX} missing (apt-get install -y busybox-static)")
    root = tmp_path_factory.mktemp("busybox-rootfs")
    root.chmod(0o755)  # mktemp makes it 0700: an unprivileged job could not even reach /bin
    (root / "bin").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for mount_point in ("proc", "dev", "tmp", "etc"):
        (root / mount_point).mkdir()
    (root / "tmp").chmod(0o1777)  # as RootfsCache makes it: runc's tmpfs takes this mode
    (root / "etc" / "hostname").write_text("permamesh\n")
    return root
