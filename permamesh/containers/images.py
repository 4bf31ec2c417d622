"""OCI images: read an image layout (or a tar of one), verify every blob, build images.

The worker process calls :func:`load_layout` or :func:`load_archive` on an image it was sent
and gets an :class:`Image` plus a :class:`LayoutBlobs`, whose :meth:`LayoutBlobs.open` streams
a blob and refuses it at the end unless its sha256 and size match the descriptor. The
:class:`~permamesh.containers.store.LayerStore` takes those streams; the
:class:`~permamesh.containers.rootfs.RootfsCache` unpacks them. Tests and the CLI call
:func:`build_image` to make deterministic images from directories.

Everything read here is untrusted: JSON is checked field by field (types, sizes, digest form
``sha256:<64 hex>``) and any failure is a :class:`ContainerError` that says why.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from permamesh.containers.errors import ContainerError

log = logging.getLogger(__name__)

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TYPES = frozenset({LAYER_TAR, LAYER_GZIP})
REF_NAME = "org.opencontainers.image.ref.name"
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_JSON = 4 << 20  # bytes: the most we read of index.json, a manifest or a config
MAX_LAYERS = 256
MAX_STRINGS = 4096  # entries in Cmd / Entrypoint / Env, each at most MAX_JSON in total


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str  # "sha256:<64 hex>"
    size: int  # bytes

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    name: str
    manifest_digest: str
    config_digest: str
    layers: tuple[Descriptor, ...]  # bottom first
    diff_ids: tuple[str, ...]  # sha256 of each uncompressed layer tar
    cmd: tuple[str, ...]  # Entrypoint followed by Cmd
    env: tuple[str, ...]  # "KEY=value"
    workdir: str

    def chain_ids(self) -> tuple[str, ...]:
        return chain_ids(self.diff_ids)


def chain_ids(diff_ids: Sequence[str]) -> tuple[str, ...]:
    """ChainID(L0) = DiffID(L0); ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return tuple(out)


def check_digest(value: Any, what: str) -> str:
    if not isinstance(value, str) or not DIGEST_RE.fullmatch(value):
        raise ContainerError(f"{what}: digest {str(value)[:80]!r} is not sha256:<64 hex>")
    return value


def _field(obj: Any, key: str, kind: type | tuple[type, ...], what: str, required: bool = True) -> Any:
    if not isinstance(obj, dict):
        raise ContainerError(f"{what}: expected a JSON object")
    if key not in obj or obj[key] is None:
        if required:
            raise ContainerError(f"{what}: missing {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ContainerError(f"{what}: {key!r} has the wrong type")
    return value


def parse_descriptor(obj: Any, what: str, media_types: frozenset[str] | None = None) -> Descriptor:
    media = _field(obj, "mediaType", str, what)
    if media_types is not None and media not in media_types:
        raise ContainerError(f"{what}: media type {media[:100]!r} is not supported")
    size = _field(obj, "size", int, what)
    if size < 0 or size > 1 << 40:
        raise ContainerError(f"{what}: size {size} out of range")
    return Descriptor(media, check_digest(obj.get("digest"), what), size)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_STRINGS or not all(isinstance(s, str) for s in value):
        raise ContainerError(f"{what}: expected a list of strings")
    return tuple(value)


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ContainerError(f"{what}: not valid JSON ({type(exc).__name__})") from None


class VerifyingReader:
    """A read-only stream of one blob that raises at EOF unless sha256 and size match."""

    def __init__(self, raw: BinaryIO, desc: Descriptor, what: str) -> None:
        self._raw, self._desc, self._label = raw, desc, f"{what} {desc.digest}"
        self._hash, self._seen, self._done = hashlib.sha256(), 0, False

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        left = self._desc.size - self._seen
        chunk = self._raw.read(left + 1 if n < 0 or n > left else n)
        self._seen += len(chunk)
        if self._seen > self._desc.size:
            raise ContainerError(f"{self._label} is longer than its size {self._desc.size}; refusing it")
        self._hash.update(chunk)
        if (not chunk or self._seen == self._desc.size) and not self._done:
            self._finish()
        return chunk

    def _finish(self) -> None:
        if self._seen != self._desc.size:
            raise ContainerError(f"{self._label} has {self._seen} bytes, not {self._desc.size}; refusing it")
        got = "sha256:" + self._hash.hexdigest()
        if got != self._desc.digest:
            raise ContainerError(f"{self._label} has digest {got}; refusing it")
        self._done = True

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LayoutBlobs:
    """Blobs of one image layout directory; ``owned`` layouts (from an archive) are deleted on close."""

    def __init__(self, root: Path, owned: bool = False) -> None:
        self.root, self.owned = Path(root), owned

    def open(self, desc: Descriptor, what: str = "blob") -> VerifyingReader:
        check_digest(desc.digest, what)
        path = self.root / "blobs" / "sha256" / desc.digest[7:]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ContainerError(f"{what} {desc.digest} is not readable in the layout ({exc.strerror})") from None
        return VerifyingReader(os.fdopen(fd, "rb"), desc, what)

    def read(self, desc: Descriptor, what: str = "blob", limit: int = MAX_JSON) -> bytes:
        if desc.size > limit:
            raise ContainerError(f"{what} {desc.digest} is {desc.size} bytes, more than {limit}; refusing it")
        with self.open(desc, what) as stream:
            data = stream.read()
            stream.read()  # reach EOF so the digest is checked even for an empty blob
        return data

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.root, ignore_errors=True)


def _read_small(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON + 1)
    except OSError as exc:
        raise ContainerError(f"{what} cannot be read ({exc.strerror})") from None
    if len(data) > MAX_JSON:
        raise ContainerError(f"{what} is larger than {MAX_JSON} bytes")
    return data


def load_layout(path: str | Path, ref: str | None = None) -> tuple[Image, LayoutBlobs]:
    """Read the image named ``ref`` (or the only one) from an OCI image layout directory."""
    root = Path(path)
    layout = _parse_json(_read_small(root / "oci-layout", "oci-layout"), "oci-layout")
    if _field(layout, "imageLayoutVersion", str, "oci-layout") != "1.0.0":
        raise ContainerError("oci-layout: imageLayoutVersion is not 1.0.0")
    index = _parse_json(_read_small(root / "index.json", "index.json"), "index.json")
    if _field(index, "schemaVersion", int, "index.json") != 2:
        raise ContainerError("index.json: schemaVersion is not 2")
    entries = _field(index, "manifests", list, "index.json")
    found: list[tuple[Descriptor, str]] = []
    for i, entry in enumerate(entries[:MAX_STRINGS]):
        what = f"index.json manifests[{i}]"
        desc = parse_descriptor(entry, what)
        annotations = _field(entry, "annotations", dict, what, required=False) or {}
        name = annotations.get(REF_NAME, "")
        if not isinstance(name, str):
            raise ContainerError(f"{what}: {REF_NAME} is not a string")
        if ref is None or name == ref:
            found.append((desc, name))
    if len(found) != 1:
        raise ContainerError(f"index.json: {len(found)} manifests match ref {ref!r}; need exactly one")
    desc, name = found[0]
    if desc.media_type != MANIFEST:
        raise ContainerError(f"index.json: {desc.media_type[:100]!r} is not an image manifest")
    blobs = LayoutBlobs(root)
    return _load_image(blobs, desc, name or ref or root.name), blobs


def _load_image(blobs: LayoutBlobs, mdesc: Descriptor, name: str) -> Image:
    manifest = _parse_json(blobs.read(mdesc, "manifest"), "manifest")
    if _field(manifest, "schemaVersion", int, "manifest") != 2:
        raise ContainerError("manifest: schemaVersion is not 2")
    if _field(manifest, "mediaType", str, "manifest", required=False) not in (None, MANIFEST):
        raise ContainerError("manifest: wrong mediaType")
    cdesc = parse_descriptor(manifest.get("config"), "manifest config", frozenset({CONFIG}))
    raw_layers = _field(manifest, "layers", list, "manifest")
    if len(raw_layers) > MAX_LAYERS:
        raise ContainerError(f"manifest: more than {MAX_LAYERS} layers")
    layers = tuple(parse_descriptor(d, f"manifest layers[{i}]", LAYER_TYPES)
                   for i, d in enumerate(raw_layers))
    config = _parse_json(blobs.read(cdesc, "config"), "config")
    rootfs = _field(config, "rootfs", dict, "config")
    if _field(rootfs, "type", str, "config rootfs") != "layers":
        raise ContainerError("config rootfs: type is not 'layers'")
    raw_ids = _field(rootfs, "diff_ids", list, "config rootfs")
    diff_ids = tuple(check_digest(d, "config rootfs diff_ids") for d in raw_ids)
    if len(diff_ids) != len(layers):
        raise ContainerError(f"config has {len(diff_ids)} diff_ids for {len(layers)} layers")
    run = _field(config, "config", dict, "config", required=False) or {}
    cmd = _strings(run.get("Entrypoint"), "config Entrypoint") + _strings(run.get("Cmd"), "config Cmd")
    env = _strings(run.get("Env"), "config Env")
    if any("=" not in e for e in env):
        raise ContainerError("config Env: every entry must be KEY=value")
    workdir = _field(run, "WorkingDir", str, "config", required=False) or "/"
    return Image(name, mdesc.digest, cdesc.digest, layers, diff_ids, cmd, env, workdir)


def load_archive(path: str | Path, ref: str | None = None, dest: str | Path | None = None,
                 max_bytes: int = 16 << 30) -> tuple[Image, LayoutBlobs]:
    """Extract a tar of an OCI layout (only plain files and dirs, nothing escaping), then load it.

    Without ``dest`` the layout goes to a temporary directory that ``blobs.close()`` removes.
    """
    owned = dest is None
    root = Path(tempfile.mkdtemp(prefix="oci-")) if dest is None else Path(dest)
    try:
        _extract_layout(Path(path), root, max_bytes)
        image, blobs = load_layout(root, ref)
    except BaseException:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
        raise
    blobs.owned = owned
    return image, blobs


def _extract_layout(archive: Path, root: Path, max_bytes: int) -> None:
    total = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = [p for p in member.name.split("/") if p not in ("", ".")]
                label = f"archive member {member.name[:200]!r}"
                if member.name.startswith("/") or ".." in parts or "\0" in member.name:
                    raise ContainerError(f"{label} escapes the layout; refusing the archive")
                if not parts:
                    continue
                target = root.joinpath(*parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isreg():
                    total += member.size
                    if total > max_bytes:
                        raise ContainerError(f"archive holds more than {max_bytes} bytes; refusing it")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                    with src, os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                else:
                    raise ContainerError(f"{label} is not a file or directory; refusing the archive")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ContainerError(f"archive {archive.name} cannot be extracted ({exc})") from None


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
