"""The researcher's side of a container job over the anonymous overlay.

:func:`run_over_overlay` builds a :class:`RunRequest` from a local image (manifest and config
blobs, the command, the limits), sends it through an
:class:`~permamesh.overlay.sender.OverlayClient` to a container worker's inbox, and
returns the :class:`RunResult` that came back as cloves, signed by that entry worker (or
raises :class:`ContainerError` with the worker's code and reason). With ``on_output``, the
job's stdout and stderr come while it runs, as chunks over the request's chunk blocks
(``docs/paths.md`` section 9), in order; the result's output must begin with what came, and
whatever the chunks did not carry is passed on from it, so the pieces join to the result's.

The image's layers must be somewhere the mesh can fetch them. :class:`ImageSeed` serves the
blobs of one local image (nothing else in the layout) on a layer server for as long as the
job runs, and its endpoint goes in the request's ``sources``; workers that already hold the
layers, or peers that do, never ask it. A seed's endpoint tells the workers that fetch from
it where the image came from (as pulling from a registry would): to stay unlinkable, seed an
image from a machine of its own, or once: after the first job, workers that hold the layers
serve them to each other.

Who calls it: ``permamesh run`` (overlay mode), :class:`permamesh.Client`, the demo, tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

from permamesh.containers.errors import ContainerError
from permamesh.containers.images import Image, LayoutBlobs
from permamesh.containers.messages import RunRequest, RunResult
from permamesh.containers.transfer import LayerServer, LayerServerThread
from permamesh.wire import ErrorReply

log = logging.getLogger(__name__)


class _ImageBlobs:
    """The store-like view a :class:`LayerServer` needs, over one image's layers in a layout."""

    def __init__(self, blobs: LayoutBlobs, image: Image) -> None:
        self.blobs = blobs
        self.sizes = {d.digest: d.size for d in image.layers}

    def _path(self, digest: str):
        return self.blobs.root / "blobs" / "sha256" / digest[7:]

    def has(self, digest: str) -> bool:
        return digest in self.sizes and self._path(digest).is_file()

    def size_of(self, digest: str) -> int:
        return self.sizes[digest]

    def holdings(self) -> frozenset[str]:
        return frozenset(d for d in self.sizes if self.has(d))

    @contextlib.contextmanager
    def pin(self, digests) -> Iterator[None]:
        yield  # a layout is never evicted

    def open(self, digest: str) -> BinaryIO:
        return open(self._path(digest), "rb")  # the fetching worker verifies what it gets


class ImageSeed:
    """A layer server for one image's blobs while jobs run (a context manager)."""

    def __init__(self, blobs: LayoutBlobs, image: Image, host: str = "127.0.0.1") -> None:
        self.thread = LayerServerThread(LayerServer(_ImageBlobs(blobs, image), host=host), name="image-seed")
        self.endpoint = ""

    def __enter__(self) -> ImageSeed:
        self.endpoint = self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.stop()


def image_blobs(blobs: LayoutBlobs, image: Image) -> tuple[bytes, bytes]:
    """The manifest and config blobs of ``image`` (verified) for a :class:`RunRequest`."""
    return blobs.read_digest(image.manifest_digest, "manifest"), blobs.read_digest(image.config_digest, "config")


def run_request(blobs: LayoutBlobs, image: Image, argv: Sequence[str] = (), sources: Sequence[str] = (),
                timeout_s: float = 30.0, memory_mb: int = 256, cpus: float = 1.0) -> RunRequest:
    manifest, config = image_blobs(blobs, image)
    return RunRequest(uuid.uuid4().hex, manifest, config, tuple(argv), timeout_s, memory_mb, cpus, tuple(sources))


def container_entries(workers) -> list:
    """The registered workers that run containers (their records name a layer server)."""
    return [w for w in workers if getattr(w, "layers", "")]


def run_over_overlay(client, req: RunRequest, entry: str | None = None,
                     on_output: Callable[[bytes, bytes], None] | None = None) -> RunResult:
    """Send ``req`` through ``client`` (an OverlayClient) to a container worker and wait;
    ``on_output(stdout, stderr)`` gets the job's output as it is written."""
    from permamesh.overlay.errors import OverlayError

    if entry is None:
        entries = container_entries(client.workers)
        if not entries:
            raise ContainerError("no worker in the registry runs containers (start one with `permamesh worker --containers`)")
        entry = entries[int.from_bytes(os.urandom(4), "big") % len(entries)].node_id
    try:
        answer = client.submit(req, entry, results=(RunResult, ErrorReply), on_output=on_output)
    except OverlayError as exc:  # not delivered, or refused by the entry worker (its code and reason)
        raise ContainerError(str(exc)) from None
    if isinstance(answer, ErrorReply):
        raise ContainerError(f"{answer.code}: {answer.message}")
    if answer.request_id != req.request_id:
        raise ContainerError("the answer is for another job")
    return answer
