"""``permamesh image add`` and ``permamesh run``: images in the data directory, jobs on the
local container workers.

- ``image add PATH``: a plain directory becomes a one-layer image (``--layer DIR`` adds more
  layers on top); an OCI image layout directory or a tar of one is imported, every blob
  verified. Images live in one OCI layout, ``DATA_DIR/images``, by name.
- ``run IMAGE -- CMD...``: the job goes to the local container worker the layer router picks
  (``DATA_DIR/containers``; the workers' layer stores and rootfs caches persist between runs),
  runs isolated, and its stdout and stderr come back; the exit code is the container's.

Who calls it: :mod:`permamesh.cli`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from permamesh.containers.errors import ContainerError
from permamesh.containers.images import REF_NAME, build_image, load_archive, load_layout

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
    p.add_argument("--runtime", default="auto", choices=["auto", "runc", "bwrap"], help="container runtime (default: auto)")


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


def run_job(args: argparse.Namespace, data_dir: Path) -> int:
    from permamesh.containers.host import ContainerMesh
    from permamesh.containers.limits import Limits

    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    image, blobs = load_layout(data_dir / "images", args.image)
    try:
        with ContainerMesh(data_dir / "containers", args.workers, serve=True) as mesh:
            out = mesh.run(image, command, blobs, Limits(timeout_s=args.timeout, memory_mb=args.memory_mb),
                           args.runtime)
    finally:
        blobs.close()
    sys.stdout.buffer.write(out.result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(out.result.stderr)
    r = out.result
    print(f"[{out.worker}] {out.choice.why}; {'warm' if out.warm else 'cold'} start (layers: {out.from_peers} "
          f"from peers, {out.from_source} from the source), prepare {out.prepare_s:.3f} s, total "
          f"{out.total_s:.3f} s, {r.runtime}, exit {r.exit_code}{', TIMED OUT' if r.timed_out else ''}"
          f"{', output truncated' if r.truncated else ''}", file=sys.stderr)
    for note in r.notes:
        print(f"  note: {note}", file=sys.stderr)
    return r.exit_code
