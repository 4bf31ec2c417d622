"""The scheduler: the permacomputer rules as pure functions over plain data.

It reads the committee's node registry, scores every node by the permacomputer formula,
decides who is paid and how much, and checks claimed locations against physics. The rules are
stated in ``docs/placement.md``; the weights live in ``weights.toml``. Modules:

- :mod:`~permamesh.scheduler.profile`: :class:`~permamesh.scheduler.profile.NodeProfile`
  (one node as the scheduler sees it, from a ``/registry`` row), great-circle distance, the
  "same location" rule and its grouping, the coarse continent table (pure).
- :mod:`~permamesh.scheduler.weights`: :class:`~permamesh.scheduler.weights.Weights` and
  ``load_weights`` (the packaged ``weights.toml`` or an override; no clock: the current year
  is a setting).
- :mod:`~permamesh.scheduler.scoring`: ``node_score`` with a ``why`` of every term; ``explain``
  (pure, deterministic: peers in node-id order).
- :mod:`~permamesh.scheduler.payments`: ``monthly_payments``: at most two paid nodes per
  location, the compensation formula and its modifiers, in whole cents with a reason for every
  figure (pure).
- :mod:`~permamesh.scheduler.physics`: ``check_location`` (no answer faster than light in
  fibre) and ``triangulate`` (pure).
- :mod:`~permamesh.scheduler.domains`: failure-domain kinds and shares; fast location grouping
  and vectorised node scores for large meshes (pure).
- :mod:`~permamesh.scheduler.placement`: ``place`` (replicas over failure domains under a
  per-domain cap), ``replace_failed`` (stable re-placement), ``place_many`` (Ray tasks).
- :mod:`~permamesh.scheduler.chaossim`: a synthetic mesh of thousands of nodes and the seed's
  failure modes against a placement; win conditions (pure).
- :mod:`~permamesh.scheduler.admission`: admission of jobs by the user's credit on the
  committee's ledger (the one module here that talks to the committee, through a query
  callable).
- :mod:`~permamesh.scheduler.payouts`: ``permamesh payouts``: ``registry_payments`` (the
  committee's ``/registry`` through a query callable -> ``monthly_payments``) and its text/JSON.
- :mod:`~permamesh.scheduler.errors`: :class:`~permamesh.scheduler.errors.SchedulerError`.

The embedded chaos drills (real processes) are :mod:`permamesh.bench.chaos`. Who calls it: ``permamesh payouts``, the demo, tests. Nothing here but admission and
payouts (through the query callable they are given) reaches the committee, and none of it reads the clock.
"""
