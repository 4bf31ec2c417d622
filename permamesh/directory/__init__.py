"""The node directory: how a node or client finds workers and relays, and their keys.

Today discovery is for one machine: each serving process writes a record under
``<data_dir>/run/`` and removes it when it stops. Modules:

- :mod:`~permamesh.directory.workers`: :class:`WorkerRecord`, the worker registry
  (``run/workers/<node_id>.json``), :func:`discover`, :func:`default_data_dir`.
- :mod:`~permamesh.directory.relays`: :class:`RelayRecord`, the relay registry
  (``run/relays/<node_id>.json``), :class:`CachedLookup` for a relay's next hops.

Who calls it: worker and relay processes register themselves; clients, the gateway, the
overlay client and the benchmarks read it. The committee-backed directory (signed node
descriptors checked against a quorum of validators, a copy kept on disk) grows here; see
docs/architecture.md.
"""
