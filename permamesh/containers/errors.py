"""The containers package's exception family.

Raised by :mod:`~permamesh.containers.images` (a layout, archive or blob we refuse),
:mod:`~permamesh.containers.store` (a blob that does not match its digest, no room under the
budget) and :mod:`~permamesh.containers.rootfs` (a layer that cannot be unpacked). Untrusted
input that is malformed is always reported as a :class:`ContainerError`, never as a crash.
"""

from __future__ import annotations

from permamesh.errors import PermameshError


class ContainerError(PermameshError):
    """An OCI image, blob or layer we refuse, or a store that cannot take more."""


class RunError(ContainerError):
    """Bad input to :func:`permamesh.containers.runner.run`, or no runtime could start it."""
