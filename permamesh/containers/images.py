"""OCI images: read an image layout (or a tar of one), verify every blob, build images.

The worker process calls :func:`load_layout` or :func:`load_archive` on an image it was sent
and gets an :class:`Image` plus a :class:`LayoutBlobs`, whose :meth:`LayoutBlobs.open` streams
a blob and refuses it at the end unless its sha256 and size match the descriptor. The
:class:`~permamesh.containers.store.LayerStore` takes those streams; the
:class:`~permamesh.containers.rootfs.RootfsCache` unpacks them. :func:`parse_image` checks
the manifest and config a peer sends with a container job. Building images from directories
is :mod:`permamesh.containers.build`.

Everything read here is untrusted: JSON is checked field by field (types, sizes, digest form
``sha256:<64 hex>``) and any failure is a :class:`ContainerError` that says why.
"""

from __future__ import annotations

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

    def read_digest(self, digest: str, what: str = "blob") -> bytes:
        """A small blob (a manifest, a config) known only by its digest, verified."""
        check_digest(digest, what)
        data = _read_small(self.root / "blobs" / "sha256" / digest[7:], f"{what} {digest}")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ContainerError(f"{what} {digest} does not match its digest; refusing it")
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
    manifest = blobs.read(mdesc, "manifest")
    cdesc = _manifest_config(_parse_json(manifest, "manifest"))
    return parse_image(manifest, blobs.read(cdesc, "config"), name)


def _manifest_config(manifest: Any) -> Descriptor:
    if _field(manifest, "schemaVersion", int, "manifest") != 2:
        raise ContainerError("manifest: schemaVersion is not 2")
    if _field(manifest, "mediaType", str, "manifest", required=False) not in (None, MANIFEST):
        raise ContainerError("manifest: wrong mediaType")
    return parse_descriptor(manifest.get("config"), "manifest config", frozenset({CONFIG}))


def parse_image(manifest_bytes: bytes, config_bytes: bytes, name: str = "") -> Image:
    """An :class:`Image` from its manifest and config blobs as sent by a peer (a container job
    over the overlay): the manifest digest is computed here, the config must match the
    manifest's descriptor (sha256 and size), and every field is checked."""
    manifest = _parse_json(manifest_bytes, "manifest")
    cdesc = _manifest_config(manifest)
    if len(config_bytes) != cdesc.size or "sha256:" + hashlib.sha256(config_bytes).hexdigest() != cdesc.digest:
        raise ContainerError(f"config does not match its descriptor {cdesc.digest}; refusing it")
    raw_layers = _field(manifest, "layers", list, "manifest")
    if len(raw_layers) > MAX_LAYERS:
        raise ContainerError(f"manifest: more than {MAX_LAYERS} layers")
    layers = tuple(parse_descriptor(d, f"manifest layers[{i}]", LAYER_TYPES)
                   for i, d in enumerate(raw_layers))
    config = _parse_json(config_bytes, "config")
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
    digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    return Image(name or digest[:19], digest, cdesc.digest, layers, diff_ids, cmd, env, workdir)


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
