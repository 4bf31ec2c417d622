"""A worker's content-addressed blob store: verified writes, LRU eviction under a byte budget.

The worker process owns one :class:`LayerStore`. Whoever fetches an image (from a layout, an
archive or a peer) calls :meth:`LayerStore.put` with the descriptor's digest and size; the
:class:`~permamesh.containers.rootfs.RootfsCache` calls :meth:`LayerStore.pin` for the layers of
a job it prepares, then :meth:`LayerStore.open`. Routing asks :meth:`LayerStore.holdings`.

On disk: ``root/blobs/sha256/<hex>`` (one file per blob, written to ``root/tmp`` first, fsynced,
renamed atomically) and ``root/lru.json`` (size and last-use sequence number of every blob,
rewritten atomically on each change, so the LRU order survives a restart). A put whose bytes do
not hash to the claimed digest, or are not exactly ``size`` long, leaves nothing behind.

Eviction drops the least recently used unpinned blobs until the bytes held fit the budget; a
put that cannot fit because the rest is pinned is refused. All methods are thread-safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from permamesh.containers.errors import ContainerError
from permamesh.containers.images import DIGEST_RE, check_digest

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per read while hashing a stream


@dataclass(frozen=True)
class StoreStats:
    hits: int  # open() or put() of a blob already held
    misses: int  # open() of a blob not held, or put() of a new one
    evicted_blobs: int
    evicted_bytes: int
    used_bytes: int
    budget_bytes: int


class LayerStore:
    def __init__(self, root: str | Path, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ContainerError("budget_bytes must be positive")
        self.root, self.budget_bytes = Path(root), budget_bytes
        self._blobs, self._tmp = self.root / "blobs" / "sha256", self.root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._entries: dict[str, list[int]] = {}  # digest -> [size, last_use]
        self._pins: dict[str, int] = {}
        self._seq = 0
        self._hits = self._misses = self._evicted_blobs = self._evicted_bytes = 0
        self._recover()

    # -- queries ---------------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        with self._lock:
            return digest in self._entries

    def size_of(self, digest: str) -> int:
        with self._lock:
            if digest not in self._entries:
                raise ContainerError(f"blob {digest} is not in the store")
            return self._entries[digest][0]

    def holdings(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._entries)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for size, _ in self._entries.values())

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self._hits, self._misses, self._evicted_blobs, self._evicted_bytes,
                              self.used_bytes(), self.budget_bytes)

    # -- reading and writing ---------------------------------------------------------------

    def open(self, digest: str) -> BinaryIO:
        """The blob's bytes (already verified when stored); counts a hit and marks it used."""
        with self._lock:
            if digest not in self._entries:
                self._misses += 1
                raise ContainerError(f"blob {digest} is not in the store")
            self._hits += 1
            self._touch(digest)
            return open(self._path(digest), "rb")

    def put(self, digest: str, data: bytes | BinaryIO, size: int) -> bool:
        """Store a blob, verifying sha256 and size as it is written; False if it was held already."""
        check_digest(digest, "put")
        if size < 0:
            raise ContainerError(f"blob {digest}: negative size")
        if size > self.budget_bytes:
            raise ContainerError(f"blob {digest} ({size} bytes) exceeds the budget {self.budget_bytes}")
        with self._lock:
            if digest in self._entries:
                self._hits += 1
                self._touch(digest)
                return False
            self._misses += 1
        tmp = self._tmp / f"{digest[7:]}.{threading.get_ident()}.{os.getpid()}"
        try:
            self._write_verified(tmp, digest, data, size)
            with self._lock:
                if digest in self._entries:  # another thread stored it meanwhile
                    tmp.unlink()
                    self._touch(digest)
                    return False
                self._make_room(size)
                os.replace(tmp, self._path(digest))
                _fsync_dir(self._blobs)
                self._entries[digest] = [size, 0]
                self._touch(digest)
        finally:
            tmp.unlink(missing_ok=True)
        log.debug("stored %s (%d bytes)", digest, size)
        return True

    @contextlib.contextmanager
    def pin(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep these blobs (held now or put while pinned) from eviction inside the block."""
        pinned = list(digests)
        with self._lock:
            for d in pinned:
                self._pins[d] = self._pins.get(d, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for d in pinned:
                    self._pins[d] -= 1
                    if not self._pins[d]:
                        del self._pins[d]

    # -- internals -------------------------------------------------------------------------

    def _path(self, digest: str) -> Path:
        return self._blobs / digest[7:]

    def _write_verified(self, tmp: Path, digest: str, data: bytes | BinaryIO, size: int) -> None:
        hasher, written = hashlib.sha256(), 0
        with open(tmp, "wb") as out:
            chunks: Iterable[bytes] = ([data] if isinstance(data, (bytes, bytearray))
                                       else iter(lambda: data.read(CHUNK), b""))
            for chunk in chunks:
                written += len(chunk)
                if written > size:
                    raise ContainerError(f"blob {digest} is longer than its size {size}; refusing it")
                hasher.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if written != size:
            raise ContainerError(f"blob {digest} has {written} bytes, not {size}; refusing it")
        got = "sha256:" + hasher.hexdigest()
        if got != digest:
            raise ContainerError(f"blob {digest} has digest {got}; refusing it")

    def _touch(self, digest: str) -> None:
        self._seq += 1
        self._entries[digest][1] = self._seq
        self._save()

    def _make_room(self, incoming: int) -> None:
        used = self.used_bytes()
        if used + incoming <= self.budget_bytes:
            return
        victims = sorted((last, d) for d, (_, last) in self._entries.items() if d not in self._pins)
        for _, d in victims:
            if used + incoming <= self.budget_bytes:
                break
            size = self._entries.pop(d)[0]
            self._path(d).unlink(missing_ok=True)
            used -= size
            self._evicted_blobs += 1
            self._evicted_bytes += size
            log.info("evicted %s (%d bytes, least recently used)", d, size)
        if used + incoming > self.budget_bytes:
            self._save()
            raise ContainerError(f"no room for {incoming} bytes: {used} of {self.budget_bytes} are pinned")

    def _save(self) -> None:
        tmp = self.root / "lru.json.tmp"
        tmp.write_text(json.dumps({"seq": self._seq, "blobs": self._entries}, sort_keys=True))
        os.replace(tmp, self.root / "lru.json")

    def _recover(self) -> None:
        """Reload the LRU index; trust the blob files on disk over it; drop stale temp files."""
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
        saved: dict = {}
        try:
            raw = json.loads((self.root / "lru.json").read_text())
            saved, self._seq = dict(raw["blobs"]), int(raw["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        for path in self._blobs.iterdir():
            digest = "sha256:" + path.name
            if not DIGEST_RE.fullmatch(digest):
                continue
            entry = saved.get(digest)
            ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], int)
            last = entry[1] if ok else 0
            self._entries[digest] = [path.stat().st_size, last]
        self._make_room(0)
        self._save()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
