"""Unpack an image's layers into a root filesystem, once per chain id.

The worker's container runner calls :meth:`RootfsCache.prepare` with an
:class:`~permamesh.containers.images.Image` (and the :class:`LayoutBlobs` it came with, for
layers the :class:`~permamesh.containers.store.LayerStore` does not hold yet) and gets
``root/<hex of the top chain id>/rootfs``. A second prepare of an image with the same layers
returns the same directory at once. At most ``max_rootfs`` directories are kept: after each
new one, the least recently prepared that no job holds (:meth:`RootfsCache.hold`) is deleted.

Layers are untrusted. Each is unpacked in order into a temporary directory next to the cache,
its uncompressed bytes checked against the config's diff_id, whiteouts (``.wh.<name>``) and
opaque markers (``.wh..wh..opq``) applied to the lower layers, and the result renamed into
place only when every layer is done. Members that would escape the rootfs are skipped and
counted, never followed: absolute or ``..`` names, paths through a symlink, relative symlinks
whose target leaves the rootfs, hard links to anything but a regular file inside it, and device
nodes or fifos. Modes are kept (directory modes applied at the end); owners are not (we may
not be root).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from permamesh.containers.errors import ContainerError
from permamesh.containers.images import LAYER_GZIP, Image, LayoutBlobs
from permamesh.containers.store import LayerStore

log = logging.getLogger(__name__)

MOUNT_POINTS = ("proc", "dev", "tmp")  # directories a container runtime mounts over

WHITEOUT, OPAQUE = ".wh.", ".wh..wh..opq"


@dataclass(frozen=True)
class RootfsStats:
    prepared: int  # rootfs directories built
    hits: int  # prepare() answered from the cache
    layers_unpacked: int
    members_skipped: int  # escaping names or links, devices, fifos, unknown types
    whiteouts: int  # whiteout and opaque markers applied


class _HashingReader:
    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.hash = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        chunk = self.raw.read(n)
        self.hash.update(chunk)
        return chunk


class RootfsCache:
    def __init__(self, root: str | Path, store: LayerStore, max_rootfs: int = 16) -> None:
        if max_rootfs < 1:
            raise ContainerError("a rootfs cache keeps at least one rootfs")
        self.root, self.store, self.max_rootfs = Path(root), store, max_rootfs
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()  # chain-id directories a running job uses
        self._prepared = self._hits = self._layers = self._skipped = self._whiteouts = 0
        self.evicted = 0

    @contextmanager
    def hold(self, image: Image) -> Iterator[None]:
        """Keep ``image``'s rootfs from eviction while a job runs in it."""
        name = self.path_for(image).parent.name
        with self._lock:
            self._held[name] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[name] -= 1
                if self._held[name] <= 0:
                    del self._held[name]

    def _evict(self) -> None:
        """Delete the least recently prepared rootfs directories beyond ``max_rootfs`` (lock held)."""
        dirs = sorted((d.stat().st_mtime_ns, d.name, d) for d in self.root.iterdir()
                      if d.is_dir() and not d.name.startswith("."))
        excess = len(dirs) - self.max_rootfs
        for _, name, path in dirs:
            if excess <= 0:
                break
            if self._held.get(name):
                continue
            shutil.rmtree(path, ignore_errors=True)
            self.evicted += 1
            excess -= 1
            log.info("evicted rootfs %s", name)

    def stats(self) -> RootfsStats:
        return RootfsStats(self._prepared, self._hits, self._layers, self._skipped, self._whiteouts)

    def path_for(self, image: Image) -> Path:
        if not image.layers:
            raise ContainerError(f"image {image.name} has no layers")
        return self.root / image.chain_ids()[-1][7:] / "rootfs"

    def prepare(self, image: Image, blobs: LayoutBlobs | None = None) -> Path:
        target = self.path_for(image)
        with self._lock:
            if target.is_dir():
                self._hits += 1
                os.utime(target.parent)  # recently used: evicted last
                return target
            digests = [d.digest for d in image.layers]
            with self.store.pin(digests):
                for desc in image.layers:
                    if not self.store.has(desc.digest):
                        if blobs is None:
                            raise ContainerError(f"layer {desc.digest} is neither in the store nor given")
                        with blobs.open(desc, "layer") as stream:
                            self.store.put(desc.digest, stream, desc.size)
                work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
                try:
                    self._build(image, work / "rootfs")
                    for point in MOUNT_POINTS:  # the runtimes mount over these, never create them
                        path = work / "rootfs" / point
                        if path.is_symlink() or (path.exists() and not path.is_dir()):
                            path.unlink()  # a layer's link here could point the mount (or chmod) outside
                        path.mkdir(mode=0o755, exist_ok=True)
                    # runc gives a tmpfs the mode of its mount point: /tmp must let any uid write
                    os.chmod(work / "rootfs" / "tmp", 0o1777)
                    try:
                        os.rename(work, target.parent)
                    except OSError:
                        if not target.is_dir():
                            raise
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            self._prepared += 1
            log.info("prepared rootfs of %s at %s", image.name, target)
            self._held[target.parent.name] += 1  # the new one is never the one evicted
            try:
                self._evict()
            finally:
                self._held[target.parent.name] -= 1
                if self._held[target.parent.name] <= 0:
                    del self._held[target.parent.name]
            return target

    def _build(self, image: Image, rootfs: Path) -> None:
        rootfs.mkdir()
        dir_modes: dict[str, int] = {}
        for desc, diff_id in zip(image.layers, image.diff_ids):
            with self.store.open(desc.digest) as raw:
                try:
                    plain: BinaryIO = gzip.GzipFile(fileobj=raw) if desc.media_type == LAYER_GZIP else raw
                    hashing = _HashingReader(plain)
                    with tarfile.open(fileobj=hashing, mode="r|") as tar:  # type: ignore[call-overload]
                        _Unpacker(self, rootfs, dir_modes).run(tar)
                    while hashing.read(1 << 20):  # the tar's trailing padding counts toward diff_id
                        pass
                except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                    raise ContainerError(f"layer {desc.digest} cannot be unpacked ({exc})") from None
            got = "sha256:" + hashing.hash.hexdigest()
            if got != diff_id:
                raise ContainerError(f"layer {desc.digest} unpacks to diff_id {got}, not {diff_id}; "
                                     "refusing it")
            self._layers += 1
        for rel in sorted(dir_modes, reverse=True):
            path = rootfs / rel if rel else rootfs
            if path.is_dir() and not path.is_symlink():
                os.chmod(path, dir_modes[rel])


class _Unpacker:
    """Applies one layer's members on top of the layers below it."""

    def __init__(self, cache: RootfsCache, rootfs: Path, dir_modes: dict[str, int]) -> None:
        self.cache, self.rootfs, self.dir_modes = cache, rootfs, dir_modes
        self.created: set[str] = set()  # paths made by this layer (opaque markers keep them)

    def skip(self, member: tarfile.TarInfo, why: str) -> None:
        self.cache._skipped += 1
        log.warning("skipping layer member %r: %s", member.name[:200], why)

    def run(self, tar: tarfile.TarFile) -> None:
        for member in tar:
            rel = _clean(member.name)
            if rel is None:
                self.skip(member, "absolute or '..' name")
                continue
            if not rel:
                continue
            parent, base = posixpath.split(rel)
            if not self._safe_parent(parent):
                self.skip(member, "its parent path goes through a symlink or a file")
                continue
            if base == OPAQUE:
                self._clear_lower(self._path(parent), parent)
                self.cache._whiteouts += 1
            elif base.startswith(WHITEOUT):
                name = base[len(WHITEOUT):]
                if name in ("", ".", ".."):
                    self.skip(member, "bad whiteout name")
                    continue
                _remove(self._path(posixpath.join(parent, name)))
                self.cache._whiteouts += 1
            else:
                self._apply(tar, member, rel)

    def _path(self, rel: str) -> Path:
        return self.rootfs / rel if rel else self.rootfs

    def _safe_parent(self, parent: str) -> bool:
        """Make the parent directories; False if any component is a symlink or not a directory."""
        path = self.rootfs
        for part in parent.split("/") if parent else []:
            path = path / part
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                return False
            if not path.exists():
                path.mkdir(mode=0o755)
                self.created.add(path.relative_to(self.rootfs).as_posix())
        return True

    def _apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str) -> None:
        path, mode = self._path(rel), member.mode & 0o7777
        if member.isdir():
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                _remove(path)
            path.mkdir(mode=0o755, exist_ok=True)
            self.dir_modes[rel] = mode
        elif member.isreg():
            _remove(path)
            src = tar.extractfile(member)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with src, os.fdopen(fd, "wb") as out:  # type: ignore[union-attr]
                shutil.copyfileobj(src, out, 1 << 20)  # type: ignore[arg-type]
            os.chmod(path, mode)
        elif member.issym():
            target = member.linkname
            if not target.startswith("/"):
                inside = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
                if inside == ".." or inside.startswith("../") or "\0" in target:
                    self.skip(member, f"symlink to {target[:200]!r} leaves the rootfs")
                    return
            _remove(path)
            os.symlink(target, path)
        elif member.islnk():
            src_rel = _clean(member.linkname)
            src = self._path(src_rel) if src_rel else None
            real_root = os.path.realpath(self.rootfs)
            plain = src is not None and os.path.realpath(src) == os.path.join(real_root, src_rel or "")
            if src is None or not plain or not src.is_file():
                self.skip(member, f"hard link to {member.linkname[:200]!r} is not a file inside the rootfs")
                return
            _remove(path)
            os.link(src, path)
        else:
            self.skip(member, "device node, fifo or unknown type")
            return
        self.created.add(rel)

    def _clear_lower(self, path: Path, rel: str) -> None:
        """Opaque directory: remove what lower layers put under it, keep this layer's entries."""
        for child in list(path.iterdir()):
            crel = posixpath.join(rel, child.name) if rel else child.name
            if crel not in self.created:
                _remove(child)
            elif child.is_dir() and not child.is_symlink():
                self._clear_lower(child, crel)


def _clean(name: str) -> str | None:
    """A member name as a relative posix path, or None if it is absolute or climbs out."""
    if name.startswith("/") or "\0" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return None if ".." in parts else "/".join(parts)


def _remove(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, _ in os.walk(path):  # we may have kept a 0o555 dir mode
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o755)
        shutil.rmtree(path)
    else:
        path.unlink()
