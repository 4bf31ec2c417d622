"""Containers: OCI images on a worker, from an image layout to an unpacked root filesystem.

- :mod:`~permamesh.containers.images`: :class:`Descriptor` and :class:`Image`; read an OCI
  image layout directory (:func:`load_layout`) or a tar of one (:func:`load_archive`,
  extracted defensively), with every blob checked against its digest and size; build a
  deterministic image from directories (:func:`build_image`), so equal inputs give equal digests.
- :mod:`~permamesh.containers.store`: :class:`LayerStore`, the worker's content-addressed blob
  store: verified atomic writes, LRU eviction under a byte budget (order persisted across
  restarts), pins that keep a running job's layers, hit/miss/eviction counters.
- :mod:`~permamesh.containers.rootfs`: :class:`RootfsCache`, which unpacks an image's layers in
  order (whiteouts, opaque directories, diff_id checks, members that would escape skipped and
  counted) into a directory keyed by the image's chain id, built aside and renamed atomically.
- :mod:`~permamesh.containers.limits`: :class:`Limits` of a job and :func:`probe_host` (which
  runtimes exist, whether cgroup limits are enforced here, and why).
- :mod:`~permamesh.containers.runner`: :func:`run`: runc (read-only rootfs, own network
  namespace with only lo, cgroup limits where the host allows, wall-clock timeout, bounded
  output), bubblewrap as the fallback.
- :mod:`~permamesh.containers.errors`: the package's exception family.
Callers: the worker process imports images into its store and prepares a rootfs per job.
"""

from permamesh.containers.errors import ContainerError

__all__ = ["ContainerError"]
