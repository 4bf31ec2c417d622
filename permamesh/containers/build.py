"""Deterministic OCI images from directories: ``permamesh image add``, tests and benchmarks.

:func:`build_image` tars each directory (sorted entries, mtime 0, owner 0:0), gzips it
without a timestamp, and writes layer, config and manifest blobs plus the ``index.json``
entry for the image's name into an OCI image layout. The same directories always give the
same digests, so two machines that build one image share its layers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from permamesh.containers.images import (CONFIG, LAYER_GZIP, LAYER_TAR, MANIFEST, REF_NAME, Descriptor, Image,
                                         _parse_json, _read_small)

log = logging.getLogger(__name__)


def _layer_tar(src: Path, out: BinaryIO) -> None:
    """A deterministic tar of ``src``: sorted entries, mtime 0, owner 0:0, modes kept."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                full = Path(dirpath) / name
                info = tar.gettarinfo(str(full), arcname=full.relative_to(src).as_posix())
                if not (info.isdir() or info.isreg() or info.issym()):
                    continue
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                info.mode &= 0o7777
                if info.isreg():
                    with open(full, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)


def _write_blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return "sha256:" + digest


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_image(src_dir: str | Path | None, out_layout_dir: str | Path, name: str, cmd: Sequence[str],
                env: Sequence[str] = (), workdir: str = "/", *,
                layers: Sequence[str | Path] | None = None, compress: bool = True) -> Image:
    """Build an image (one layer from ``src_dir``, or one per directory in ``layers``) into a layout.

    The layout's index.json keeps other refs and replaces an existing entry named ``name``.
    """
    out = Path(out_layout_dir)
    (out / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    sources = [Path(p) for p in (layers if layers is not None else [src_dir])]
    descs: list[Descriptor] = []
    diff_ids: list[str] = []
    for src in sources:
        with tempfile.TemporaryFile() as raw:
            _layer_tar(src, raw)
            raw.seek(0)
            tar_bytes = raw.read()
        diff_ids.append("sha256:" + hashlib.sha256(tar_bytes).hexdigest())
        blob = gzip.compress(tar_bytes, mtime=0) if compress else tar_bytes
        descs.append(Descriptor(LAYER_GZIP if compress else LAYER_TAR, _write_blob(out, blob), len(blob)))
    config = _dump({"architecture": "amd64", "os": "linux",
                    "config": {"Cmd": list(cmd), "Env": list(env), "WorkingDir": workdir},
                    "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    cdesc = Descriptor(CONFIG, _write_blob(out, config), len(config))
    manifest = _dump({"schemaVersion": 2, "mediaType": MANIFEST, "config": cdesc.to_json(),
                      "layers": [d.to_json() for d in descs]})
    mdesc = Descriptor(MANIFEST, _write_blob(out, manifest), len(manifest))
    entries = []
    if (out / "index.json").exists():
        old = _parse_json(_read_small(out / "index.json", "index.json"), "index.json")
        kept = old.get("manifests", []) if isinstance(old, dict) else []
        entries = [e for e in kept
                   if isinstance(e, dict) and (e.get("annotations") or {}).get(REF_NAME) != name]
    entries.append({**mdesc.to_json(), "annotations": {REF_NAME: name}})
    (out / "index.json").write_bytes(_dump({"schemaVersion": 2, "manifests": entries}))
    (out / "oci-layout").write_bytes(_dump({"imageLayoutVersion": "1.0.0"}))
    log.info("built image %s (%d layers) manifest %s", name, len(descs), mdesc.digest)
    return Image(name, mdesc.digest, cdesc.digest, tuple(descs), tuple(diff_ids),
                 tuple(cmd), tuple(env), workdir)
