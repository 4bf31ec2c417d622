"""``permamesh demo``: the embedded mesh on one machine, and its parts.

- :mod:`~permamesh.demo.mesh`: :class:`EmbeddedMesh`, worker and relay processes on loopback
  owned by one parent (also used by tests and benchmarks).
- :mod:`~permamesh.demo.run`: the demo itself: prompts through the overlay, a relay drill, a
  burst, then the parts below, figures and a clean stop.
- :mod:`~permamesh.demo.containers`: a busybox job through the overlay, cold then warm.
- :mod:`~permamesh.demo.committee`: the committee, registration, an epoch, a validator drill.
- :mod:`~permamesh.demo.gateway`: the OpenAI-compatible gateway and dashboard, asked plainly
  and streamed.

Who calls it: the CLI (``permamesh demo``), tests and benchmarks (the embedded mesh).
Child processes are started through :mod:`permamesh.ops.procs`.
"""
