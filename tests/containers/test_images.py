"""OCI images: build from directories, load back, and refuse every kind of tampering."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from permamesh.containers.errors import ContainerError
from permamesh.containers.build import build_image
from permamesh.containers.images import (
    LAYER_GZIP,
    Image,
    chain_ids,
    load_archive,
    load_layout,
)


def make_src(root: Path) -> Path:
    src = root / "src"
    (src / "bin").mkdir(parents=True)
    (src / "etc").mkdir()
    (src / "etc" / "motd").write_text("hello from the mesh\n")
    script = src / "bin" / "run.sh"
    script.write_text("#!/bin/sh\necho ok\n")
    script.chmod(0o755)
    return src


def build(tmp: Path, out: str = "layout") -> Image:
    return build_image(make_src(tmp) if not (tmp / "src").exists() else tmp / "src", tmp / out, "demo:1",
                       ["/bin/run.sh"], env=["A=1"], workdir="/work")


def test_build_then_load_round_trips(tmp_path):
    built = build(tmp_path)
    image, blobs = load_layout(tmp_path / "layout", "demo:1")
    assert image == built
    assert image.cmd == ("/bin/run.sh",) and image.env == ("A=1",) and image.workdir == "/work"
    assert image.layers[0].media_type == LAYER_GZIP
    assert image.chain_ids() == image.diff_ids  # one layer: the chain id is its diff id
    assert blobs.read(image.layers[0], "layer", limit=1 << 30)[:2] == b"\x1f\x8b"


def test_same_input_gives_same_digests(tmp_path):
    first = build(tmp_path, "one")
    second = build(tmp_path, "two")
    assert first.manifest_digest == second.manifest_digest
    assert first.layers == second.layers


def test_chain_ids_follow_the_spec():
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    expected = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain_ids([a, b]) == (a, expected)


def test_multi_layer_build(tmp_path):
    (tmp_path / "l1").mkdir()
    (tmp_path / "l1" / "x").write_text("1")
    (tmp_path / "l2").mkdir()
    (tmp_path / "l2" / "y").write_text("2")
    image = build_image(None, tmp_path / "out", "two", ["/x"], layers=[tmp_path / "l1", tmp_path / "l2"])
    loaded, _ = load_layout(tmp_path / "out")
    assert len(loaded.layers) == 2 and loaded == image


def test_a_flipped_byte_in_a_layer_is_refused(tmp_path):
    image = build(tmp_path)
    _, blobs = load_layout(tmp_path / "layout")
    blob = tmp_path / "layout" / "blobs" / "sha256" / image.layers[0].digest[7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ContainerError, match=rf"layer {image.layers[0].digest} has digest sha256:[0-9a-f]{{64}}; refusing it"):
        blobs.read(image.layers[0], "layer", limit=1 << 30)


def rewrite_manifest(layout: Path, image: Image, edit) -> None:
    """Replace the manifest by an edited one, with index.json pointing at it correctly."""
    manifest = json.loads((layout / "blobs" / "sha256" / image.manifest_digest[7:]).read_bytes())
    edit(manifest)
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].update(digest="sha256:" + digest, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


def test_a_wrong_layer_size_in_the_manifest_is_refused(tmp_path):
    image = build(tmp_path)

    def shrink(m):
        m["layers"][0]["size"] -= 1

    rewrite_manifest(tmp_path / "layout", image, shrink)
    loaded, blobs = load_layout(tmp_path / "layout")
    with pytest.raises(ContainerError, match="longer than its size"):
        blobs.read(loaded.layers[0], "layer", limit=1 << 30)


def test_a_wrong_config_digest_in_the_manifest_is_refused(tmp_path):
    image = build(tmp_path)
    other = image.layers[0].digest

    def swap(m):
        m["config"]["digest"] = other  # points at the layer blob: size and digest both disagree

    rewrite_manifest(tmp_path / "layout", image, swap)
    with pytest.raises(ContainerError, match="config sha256:"):
        load_layout(tmp_path / "layout")


def test_a_manifest_that_does_not_match_index_json_is_refused(tmp_path):
    build(tmp_path)
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:" + "0" * 64
    (tmp_path / "layout" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ContainerError, match="manifest"):
        load_layout(tmp_path / "layout")


def pack(layout: Path, archive: Path, extra: tuple[str, bytes] | None = None) -> None:
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
        if extra:
            info = tarfile.TarInfo(extra[0])
            info.size = len(extra[1])
            tar.addfile(info, io.BytesIO(extra[1]))


def test_archive_round_trips_and_cleans_up(tmp_path):
    built = build(tmp_path)
    pack(tmp_path / "layout", tmp_path / "img.tar")
    image, blobs = load_archive(tmp_path / "img.tar")
    assert image == built
    blobs.close()
    assert not blobs.root.exists()


@pytest.mark.parametrize("name", ["../evil", "/abs/evil", "blobs/../../evil"])
def test_archive_members_that_escape_are_refused(tmp_path, name):
    build(tmp_path)
    pack(tmp_path / "layout", tmp_path / "img.tar", (name, b"pwned"))
    dest = tmp_path / "x" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(ContainerError, match="escapes the layout"):
        load_archive(tmp_path / "img.tar", dest=dest)
    assert not (tmp_path / "x" / "evil").exists() and not (tmp_path / "evil").exists()


def test_archive_links_are_refused(tmp_path):
    build(tmp_path)
    with tarfile.open(tmp_path / "img.tar", "w") as tar:
        tar.add(tmp_path / "layout", arcname=".")
        info = tarfile.TarInfo("blobs/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(info)
    with pytest.raises(ContainerError, match="not a file or directory"):
        load_archive(tmp_path / "img.tar")


def test_garbage_archive_is_a_container_error(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ContainerError):
        load_archive(tmp_path / "junk.tar")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
fuzz = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@fuzz
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzzed_index_json_only_raises_container_error(tmp_path, data):
    layout = tmp_path / "fz"
    layout.mkdir(exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_bytes(data)
    with pytest.raises(ContainerError):
        load_layout(layout)


def manifest_shaped(value):
    return json.dumps({"schemaVersion": 2, "config": value, "layers": [value]}).encode()


@fuzz
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()) | json_values.map(manifest_shaped))
def test_fuzzed_manifest_only_raises_container_error(tmp_path, data):
    layout = tmp_path / "fz"
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + digest, "size": len(data)}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    with pytest.raises(ContainerError):
        load_layout(layout)


def config_shaped(value):
    return json.dumps({"rootfs": {"type": "layers", "diff_ids": value},
                       "config": {"Cmd": value, "Env": value, "WorkingDir": value}}).encode()


@fuzz
@given(data=json_values.map(lambda v: json.dumps(v).encode()) | json_values.map(config_shaped))
def test_fuzzed_config_only_raises_container_error(tmp_path, data):
    layout = tmp_path / "fz"
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def put(blob: bytes, media: str) -> dict:
        digest = hashlib.sha256(blob).hexdigest()
        (layout / "blobs" / "sha256" / digest).write_bytes(blob)
        return {"mediaType": media, "digest": "sha256:" + digest, "size": len(blob)}

    manifest = json.dumps({"schemaVersion": 2, "config": put(data, "application/vnd.oci.image.config.v1+json"),
                           "layers": [{"mediaType": LAYER_GZIP, "digest": "sha256:" + "0" * 64, "size": 1}]})
    entry = put(manifest.encode(), "application/vnd.oci.image.manifest.v1+json")
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    with pytest.raises(ContainerError):
        load_layout(layout)
