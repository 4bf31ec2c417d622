"""The operator's side: running processes, their metrics and their health.

- :mod:`~permamesh.ops.procs`: child processes: spawn in their own session with a
  parent-death signal, wait for the ``READY`` line, stop in order (embedded mesh, devnet).
- :mod:`~permamesh.ops.metrics`: Prometheus registries per component, gauges read at scrape
  time, the exporter thread, ``DATA_DIR/run/metrics`` records.
- :mod:`~permamesh.ops.health`: :class:`HealthMonitor`, the free health checks of every
  registered process, and their alerts.
- :mod:`~permamesh.ops.netns`: :class:`Hosts`, simulated hosts in network namespaces on one bridge.
- :mod:`~permamesh.ops.capture`: :class:`Capture`, a bounded packet capture on those hosts' bridge.
- :mod:`~permamesh.ops.delayline`: a one-way delay between a host and the bridge where there is no netem.

Who calls it: every process imports :mod:`metrics`; the CLI (``permamesh health``), the
gateway and the dashboard read :mod:`health`; launchers use :mod:`procs`. Pure modules
never import this package.
"""
