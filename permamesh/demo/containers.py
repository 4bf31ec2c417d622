"""The demo's container part: a busybox image run through the overlay on the mesh's workers.

When this machine has a container runtime (runc or bubblewrap) and ``/bin/busybox`` (the
Debian ``busybox-static`` package; ``make setup`` installs all three), the demo's workers
start with ``--containers`` and this part builds a two-layer busybox image into the data
directory, seeds its layers from the demo process, and runs a job through the anonymous
overlay twice: cold (layers fetched from the seed and unpacked), then entering at another
worker, whose router hands the job to the worker already holding the layers (warm). Without
a runtime it says why and the demo goes on.

Who calls it: :mod:`permamesh.demo.run`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from permamesh.containers.errors import ContainerError

log = logging.getLogger(__name__)

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "uname", "id", "sleep")
SCRIPT = 'echo "hello from a container on $(uname -n): uid $(id -u), args: $*"\n'


def available() -> str:
    """'' when containers can run here, else why not."""
    from permamesh.containers.limits import probe_host

    host = probe_host()
    if host.runc is None and host.bwrap is None:
        return "no container runtime (apt-get install runc bubblewrap)"
    if not BUSYBOX.exists():
        return f"{BUSYBOX} missing (apt-get install busybox-static)"
    return ""


def build_demo_image(data_dir: Path, name: str = "demo-busybox"):
    """A busybox base layer and an app layer, into DATA_DIR/images (deterministic)."""
    from permamesh.containers.build import build_image

    with tempfile.TemporaryDirectory() as tmp:
        base, app = Path(tmp) / "base", Path(tmp) / "app"
        (base / "bin").mkdir(parents=True)
        shutil.copy2(BUSYBOX, base / "bin" / "busybox")
        for applet in APPLETS:
            (base / "bin" / applet).symlink_to("busybox")
        (app / "app").mkdir(parents=True)
        (app / "app" / "hello.sh").write_text(SCRIPT)
        return build_image(None, data_dir / "images", name, ["/bin/sh", "/app/hello.sh"], layers=[base, app])


def container_jobs(data_dir: Path, relays, workers, say) -> None:
    from permamesh.containers.images import load_layout
    from permamesh.containers.jobs import ImageSeed, container_entries, run_over_overlay, run_request
    from permamesh.overlay.sender import OverlayClient, OverlayConfig

    image = build_demo_image(data_dir)
    entries = container_entries(workers)
    say(f"\n== container jobs through the overlay: image {image.name}, {len(image.layers)} layers "
        f"({sum(d.size for d in image.layers) / 2**20:.1f} MiB), {len(entries)} container workers ==")
    _, blobs = load_layout(data_dir / "images", image.name)
    try:
        with OverlayClient(relays, workers, OverlayConfig(answer_timeout_s=120.0)) as client, \
                ImageSeed(blobs, image) as seed:
            first = None
            for i, entry in enumerate([entries[0], entries[-1]]):
                if first is not None:  # enter at another worker: the router picks the warm one
                    entry = next((w for w in entries if w.node_id != first.worker_id), entry)
                req = run_request(blobs, image, ["/bin/sh", "/app/hello.sh", f"run-{i + 1}"], [seed.endpoint], 30.0)
                r = run_over_overlay(client, req, entry.node_id)
                first = first or r
                say(f"$ permamesh run {image.name} -- /bin/sh /app/hello.sh run-{i + 1}   (entering at {entry.node_id[:6]})")
                say("  " + r.stdout.decode(errors="replace").strip())
                say(f"  [{r.worker_id[:6]}] exit {r.exit_code}, {r.runtime}, {'warm' if r.warm else 'cold'} start: "
                    f"prepare {r.prepare_s:.3f} s, total {r.total_s:.3f} s; layers {r.from_peers} from peers, "
                    f"{r.from_source} from the seed; {r.why}")
    except ContainerError as exc:
        say(f"  container job failed: {exc}")
    finally:
        blobs.close()
