"""``permamesh image add`` and ``permamesh run``: images in the data directory, jobs on the
local container workers.

- ``image add PATH``: a plain directory becomes a one-layer image (``--layer DIR`` adds more
  layers on top); an OCI image layout directory or a tar of one is imported, every blob
  verified. Images live in one OCI layout, ``DATA_DIR/images``, by name.
- ``run IMAGE -- CMD...``: through the anonymous overlay to the mesh's container workers
  (``permamesh worker --containers``), whose router picks the one holding most layers; the
  image's layers are seeded from this machine for the job. The mesh is the committee's
  directory (``--join``, ``$PERMAMESH_JOIN`` or ``DATA_DIR/join``). Without one, or without
  container workers running in it (or with ``--via local``), the job goes to local container workers inside this
  command (``DATA_DIR/containers``; their stores and rootfs caches persist between runs).
  Either way it runs isolated and its stdout and stderr are written here as the job writes
  them (through the overlay: as chunks over the reply paths, checked against the final
  result); the exit code is the container's.

Who calls it: :mod:`permamesh.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

from permamesh.containers.errors import ContainerError
from permamesh.containers.build import build_image
from permamesh.containers.images import REF_NAME, load_archive, load_layout

log = logging.getLogger(__name__)


def add_image_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a directory (built into an image), an OCI image layout, or a tar of one")
    p.add_argument("--name", default=None, help="image name (default: the directory's name, or the layout's ref)")
    p.add_argument("--layer", action="append", type=Path, default=[], help="another directory as a layer on top (repeatable)")
    p.add_argument("--cmd", default="/bin/sh", help="default command, split on spaces (default: /bin/sh)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the image's environment (repeatable)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image name (from `permamesh image add`); options go before it, the command after --")
    p.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command and its arguments (default: the image's command)")
    p.add_argument("--workers", type=int, default=3, help="local container workers to route among (count, default: 3)")
    p.add_argument("--timeout", type=float, default=30.0, help="wall-clock limit of the job (seconds, default: 30)")
    p.add_argument("--memory-mb", type=int, default=256, help="memory limit where the host enforces it (MiB, default: 256)")
    p.add_argument("--runtime", default="auto", choices=["auto", "runc", "bwrap"], help="container runtime of local workers (default: auto)")
    p.add_argument("--via", default="auto", choices=["auto", "overlay", "local"],
                   help="overlay: through the anonymous overlay to the mesh's container workers (`permamesh worker "
                        "--containers`); local: container workers inside this command; auto: overlay when the "
                        "committee's directory has container workers and enough relays (default: auto)")
    p.add_argument("--join", action="append", default=None, metavar="VALIDATOR",
                   help="the mesh's committee: a validator's address (comma-separated or repeatable; default: "
                        "$PERMAMESH_JOIN, else DATA_DIR/join written by `permamesh demo --serve`)")


def _import_layout(src: Path, dest: Path, name: str | None) -> str:
    image, blobs = load_archive(src) if src.is_file() else load_layout(src)
    try:
        out = dest / "blobs" / "sha256"
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"digest": image.manifest_digest}
        for digest in [image.manifest_digest, image.config_digest] + [d.digest for d in image.layers]:
            target = out / digest.split(":", 1)[1]
            if not target.exists():
                shutil.copyfile(Path(blobs.root) / "blobs" / "sha256" / digest.split(":", 1)[1], target)
        name = name or image.name
        index_path = dest / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
        size = (out / image.manifest_digest.split(":", 1)[1]).stat().st_size
        index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != name]
        index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
                                   "size": size, "annotations": {REF_NAME: name}})
        (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        index_path.write_text(json.dumps(index, indent=1))
        load_layout(dest, name)  # verify the result: every blob against its digest
    finally:
        blobs.close()
    return name


def image_add(args: argparse.Namespace, data_dir: Path) -> int:
    dest, path = data_dir / "images", args.path.expanduser()
    if not path.exists():
        raise ContainerError(f"{path} does not exist")
    if path.is_file() or (path / "oci-layout").exists():
        name = _import_layout(path, dest, args.name)
        image, blobs = load_layout(dest, name)
        blobs.close()
    else:
        name = args.name or path.resolve().name
        image = build_image(None, dest, name, args.cmd.split(), args.env, layers=[path, *args.layer])
    print(f"image {name}: {len(image.layers)} layers, manifest {image.manifest_digest}")
    for desc in image.layers:
        print(f"  layer {desc.digest} ({desc.size} bytes)")
    return 0


def _overlay_client(data_dir: Path, via: str, timeout_s: float, join: list[str] | None = None):
    """An OverlayClient over the committee's directory, or None when ``via`` allows local
    workers instead."""
    from permamesh.containers.jobs import container_entries
    from permamesh.directory.committee import CommitteeDirectory
    from permamesh.directory.join import resolve_join
    from permamesh.overlay.sender import OverlayClient, OverlayConfig

    if via == "local":
        return None
    committee = resolve_join(join, data_dir, required="permamesh run --via overlay" if via == "overlay" else "")
    relays, workers, config = [], [], OverlayConfig()
    if committee:
        directory = CommitteeDirectory(committee, data_dir / "directory" / "client.json")
        relays, workers = directory.relays(), directory.workers()
    why = ("no committee to join" if not committee else
           "no container workers running in the committee's directory" if not container_entries(workers) else
           f"only {len(relays)} relays running (the overlay needs {config.n * config.hops})"
           if len(relays) < config.n * config.hops else "")
    if why:
        if via == "overlay":
            raise ContainerError(f"cannot go through the overlay: {why}")
        log.info("%s: running on local container workers", why)
        return None
    return OverlayClient(relays, workers, dataclasses.replace(config, answer_timeout_s=timeout_s + 180.0))


class _Printer:
    """Writes a job's output on our stdout and stderr as it comes (``on_output``); at the end
    (:meth:`finish`), whatever the result holds beyond what came."""

    def __init__(self) -> None:
        self.written = [0, 0]  # bytes of stdout, of stderr

    def __call__(self, stdout: bytes, stderr: bytes) -> None:
        for i, (stream, data) in enumerate(((sys.stdout, stdout), (sys.stderr, stderr))):
            if data:
                stream.buffer.write(data)
                stream.flush()
                self.written[i] += len(data)

    def finish(self, r) -> None:
        self(r.stdout[self.written[0]:], r.stderr[self.written[1]:])


def _run_over_overlay(client, args: argparse.Namespace, image, blobs, command: list[str]) -> int:
    from permamesh.containers.jobs import ImageSeed, run_over_overlay, run_request

    with client, ImageSeed(blobs, image) as seed:
        req = run_request(blobs, image, command, [seed.endpoint], args.timeout, args.memory_mb)
        printer = _Printer()
        r = run_over_overlay(client, req, on_output=printer)
        printer.finish(r)  # nothing: the overlay client released the rest already
        d = client.last
    head = (f"[{r.worker_id}] via the overlay ({d.cloves_sent} cloves, {d.paths_failed} paths failed, "
            f"{d.elapsed_s:.2f} s): {r.why}")
    return _report(r, head, r.warm, r.from_peers, r.from_source, r.prepare_s, r.total_s)


def _report(r, head: str, warm: bool, from_peers: int, from_source: int, prepare_s: float, total_s: float) -> int:
    """What happened, after the job's output (already written as it came); the container's
    exit code."""
    print(f"{head}; {'warm' if warm else 'cold'} start (layers: {from_peers} from peers, {from_source} from the "
          f"source), prepare {prepare_s:.3f} s, total {total_s:.3f} s, {r.runtime}, exit {r.exit_code}"
          f"{', TIMED OUT' if r.timed_out else ''}{', output truncated' if r.truncated else ''}", file=sys.stderr)
    for note in r.notes:
        print(f"  note: {note}", file=sys.stderr)
    return r.exit_code


def run_job(args: argparse.Namespace, data_dir: Path) -> int:
    from permamesh.containers.host import ContainerMesh
    from permamesh.containers.limits import Limits

    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    image, blobs = load_layout(data_dir / "images", args.image)
    client = _overlay_client(data_dir, args.via, args.timeout, args.join)
    if client is not None:
        try:
            return _run_over_overlay(client, args, image, blobs, command)
        finally:
            blobs.close()
    printer = _Printer()
    try:
        with ContainerMesh(data_dir / "containers", args.workers, serve=True) as mesh:
            out = mesh.run(image, command, blobs, Limits(timeout_s=args.timeout, memory_mb=args.memory_mb),
                           args.runtime, on_output=printer)
    finally:
        blobs.close()
    printer.finish(out.result)  # e.g. runc's own words on a missing executable
    return _report(out.result, f"[{out.worker}] {out.choice.why}", out.warm, out.from_peers, out.from_source,
                   out.prepare_s, out.total_s)
