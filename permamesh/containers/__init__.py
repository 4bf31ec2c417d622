"""Containers: OCI images on a worker, from an image layout to an unpacked root filesystem.

- :mod:`~permamesh.containers.images`: :class:`Descriptor` and :class:`Image`; read an OCI
  image layout directory (:func:`load_layout`) or a tar of one (:func:`load_archive`,
  extracted defensively), with every blob checked against its digest and size;
  :func:`parse_image` for the manifest and config a job carries.
- :mod:`~permamesh.containers.build`: :func:`build_image`, deterministic images from
  directories, so equal inputs give equal digests.
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
- :mod:`~permamesh.containers.placement`: :class:`LayerRouter`, the hash-radix tree over
  layer chains, traded against load and missing bytes.
- :mod:`~permamesh.containers.transfer`: the layer server (blobs by digest, holdings) and
  :func:`fetch_layer`, which trusts no peer.
- :mod:`~permamesh.containers.host`: :class:`ContainerWorker` (fetch, prepare, run) and the
  in-process :class:`ContainerMesh`.
- :mod:`~permamesh.containers.messages`: ``RunRequest``, ``RunOutput``, ``RunResult``, ``ForwardedRun``.
- :mod:`~permamesh.containers.service`: :class:`ContainerService`, the container side of a
  worker process (``permamesh worker --containers``): jobs from the overlay routed by layers.
- :mod:`~permamesh.containers.jobs`: the client's side (``ImageSeed``, ``run_over_overlay``).
- :mod:`~permamesh.containers.commands`: ``permamesh image add`` and ``permamesh run``.
- :mod:`~permamesh.containers.errors`: the package's exception family.
Callers: the worker process (through the service), the CLI, the demo and the benchmark.
"""

from permamesh.containers.errors import ContainerError

__all__ = ["ContainerError"]
