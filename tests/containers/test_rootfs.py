"""Unpacking layers into a rootfs: whiteouts, opaque dirs, hostile members, and the cache."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from permamesh.containers.errors import ContainerError
from permamesh.containers.build import build_image
from permamesh.containers.images import CONFIG, LAYER_TAR, MANIFEST, load_layout
from permamesh.containers.rootfs import RootfsCache
from permamesh.containers.store import LayerStore


def write(path: Path, text: str = "x", mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


@pytest.fixture
def cache(tmp_path):
    return RootfsCache(tmp_path / "rootfs", LayerStore(tmp_path / "store", 1 << 24))


def test_whiteouts_and_opaque_dirs_hide_lower_files(tmp_path, cache):
    low, up = tmp_path / "low", tmp_path / "up"
    write(low / "keep.txt", "kept")
    write(low / "gone.txt")
    write(low / "bin" / "tool.sh", "#!/bin/sh\n", 0o755)
    write(low / "opq" / "old.txt")
    write(low / "opq" / "sub" / "older.txt")
    write(low / "dir" / "a.txt")
    write(up / ".wh.gone.txt", "")
    write(up / ".wh.dir", "")
    write(up / "opq" / ".wh..wh..opq", "")
    write(up / "opq" / "new.txt", "fresh")
    image = build_image(None, tmp_path / "layout", "wh", ["/bin/tool.sh"], layers=[low, up])
    _, blobs = load_layout(tmp_path / "layout")
    root = cache.prepare(image, blobs)
    assert (root / "keep.txt").read_text() == "kept"
    assert not (root / "gone.txt").exists() and not (root / "dir").exists()
    assert sorted(p.name for p in (root / "opq").iterdir()) == ["new.txt"]  # this layer's file stays
    assert not any(p.name.startswith(".wh.") for p in root.rglob("*"))
    assert os.stat(root / "bin" / "tool.sh").st_mode & 0o777 == 0o755
    assert cache.stats().whiteouts == 3 and cache.stats().layers_unpacked == 2


def test_second_prepare_is_a_cache_hit(tmp_path, cache):
    write(tmp_path / "src" / "f", "1")
    image = build_image(tmp_path / "src", tmp_path / "layout", "c", ["/f"])
    _, blobs = load_layout(tmp_path / "layout")
    first = cache.prepare(image, blobs)
    second = cache.prepare(image)  # layers now come from the store; no unpacking at all
    assert first == second == cache.path_for(image)
    assert first.parent.name == image.chain_ids()[-1][7:]
    stats = cache.stats()
    assert (stats.prepared, stats.hits, stats.layers_unpacked) == (1, 1, 1)
    assert [p.name for p in cache.root.iterdir()] == [first.parent.name]  # no temp dirs left


def layout_from_tars(layout: Path, tars: list[bytes], diff_ids: list[str] | None = None):
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media, "digest": "sha256:" + digest, "size": len(data)}

    ids = diff_ids or ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    config = put(json.dumps({"rootfs": {"type": "layers", "diff_ids": ids}}).encode(), CONFIG)
    manifest = put(json.dumps({"schemaVersion": 2, "config": config,
                               "layers": [put(t, LAYER_TAR) for t in tars]}).encode(), MANIFEST)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return load_layout(layout)


def tar_of(*members: tuple[str, bytes, str, str]) -> bytes:
    """Members as (name, data, kind, linkname); kind in file/sym/lnk/chr/dir."""
    buf = io.BytesIO()
    kinds = {"file": tarfile.REGTYPE, "sym": tarfile.SYMTYPE, "lnk": tarfile.LNKTYPE,
             "chr": tarfile.CHRTYPE, "dir": tarfile.DIRTYPE}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kinds[kind], link, len(data)
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buf.getvalue()


def test_escaping_members_are_skipped_and_counted(tmp_path, cache):
    outside = tmp_path / "outside"
    outside.mkdir()
    layer = tar_of(
        ("ok.txt", b"fine", "file", ""),
        ("up", b"", "sym", "../../../../" + str(outside).lstrip("/")),  # relative, leaves the rootfs
        ("up/pwned", b"1", "file", ""),  # not through the skipped link: lands in a real dir
        ("abs", b"", "sym", str(outside)),  # absolute links are fine inside a container...
        ("abs/pwned", b"2", "file", ""),  # ...but we never write through one
        ("../evil", b"3", "file", ""),
        ("/etc/evil", b"4", "file", ""),
        ("hard", b"", "lnk", "../../outside/x"),
        ("hard2", b"", "lnk", "abs"),  # hard link to a symlink
        ("tty", b"", "chr", ""),
        ("dup", b"", "lnk", "ok.txt"),  # a fair hard link
    )
    image, blobs = layout_from_tars(tmp_path / "layout", [layer])
    root = cache.prepare(image, blobs)
    assert list(outside.iterdir()) == [] and not (tmp_path / "evil").exists()
    assert (root / "ok.txt").read_text() == (root / "dup").read_text() == "fine"
    assert (root / "up").is_dir() and not (root / "up").is_symlink()
    assert os.readlink(root / "abs") == str(outside)
    assert not (root / "tty").exists() and not (root / "hard").exists() and not (root / "hard2").exists()
    assert cache.stats().members_skipped == 7


def test_a_layer_that_does_not_match_its_diff_id_is_refused(tmp_path, cache):
    layer = tar_of(("f", b"data", "file", ""))
    image, blobs = layout_from_tars(tmp_path / "layout", [layer], diff_ids=["sha256:" + "1" * 64])
    with pytest.raises(ContainerError, match="unpacks to diff_id"):
        cache.prepare(image, blobs)
    assert not cache.path_for(image).exists() and list(cache.root.iterdir()) == []


def test_a_truncated_layer_is_a_container_error(tmp_path, cache):
    layer = tar_of(("f", b"data" * 1000, "file", ""))[:700]
    image, blobs = layout_from_tars(tmp_path / "layout", [layer])
    with pytest.raises(ContainerError):
        cache.prepare(image, blobs)
    assert list(cache.root.iterdir()) == []


def test_missing_layers_without_blobs_are_refused(tmp_path, cache):
    write(tmp_path / "src" / "f")
    image = build_image(tmp_path / "src", tmp_path / "layout", "m", ["/f"])
    with pytest.raises(ContainerError, match="neither in the store"):
        cache.prepare(image)


def test_old_rootfs_dirs_are_evicted_but_never_one_in_use(tmp_path):
    cache = RootfsCache(tmp_path / "rootfs", LayerStore(tmp_path / "store", 1 << 24), max_rootfs=2)
    images = []
    for i in range(4):
        write(tmp_path / f"src{i}" / "f", str(i))
        images.append(build_image(tmp_path / f"src{i}", tmp_path / "layout", f"i{i}", ["/f"]))
    _, blobs = load_layout(tmp_path / "layout", "i0")
    with cache.hold(images[0]):
        for image in images[:3]:
            cache.prepare(image, blobs)
        # three prepared, two kept: the oldest one not held (i1) went, the held i0 stayed
        assert cache.path_for(images[0]).is_dir() and not cache.path_for(images[1]).exists()
        assert cache.path_for(images[2]).is_dir() and cache.evicted == 1
    cache.prepare(images[0])  # a hit makes i0 the most recently used
    cache.prepare(images[3], blobs)
    assert not cache.path_for(images[2]).exists()
    assert cache.path_for(images[0]).is_dir() and cache.path_for(images[3]).is_dir()
    assert len([p for p in cache.root.iterdir()]) == 2 and cache.evicted == 2


def test_a_layer_cannot_make_a_mount_point_a_link_out(tmp_path, cache):
    """/tmp as an absolute symlink would point the chmod and the runtime's mount at the host."""
    outside = tmp_path / "host-dir"
    outside.mkdir(mode=0o700)
    src = tmp_path / "src"
    src.mkdir()
    (src / "tmp").symlink_to(outside)
    (src / "proc").write_text("not a directory")
    image = build_image(src, tmp_path / "layout", "links", ["/bin/sh"])
    _, blobs = load_layout(tmp_path / "layout")
    root = cache.prepare(image, blobs)
    assert (root / "tmp").is_dir() and not (root / "tmp").is_symlink()
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777 and (root / "proc").is_dir()
    assert outside.stat().st_mode & 0o777 == 0o700  # the host directory was not touched
