"""The layer store: verified writes, LRU eviction under a budget, pins, and restarts."""

from __future__ import annotations

import hashlib
import io
import threading

import pytest

from permamesh.containers.errors import ContainerError
from permamesh.containers.store import LayerStore


def blob(tag: str, size: int = 100) -> tuple[str, bytes]:
    data = (tag.encode() * size)[:size]
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def test_put_then_open(tmp_path):
    store = LayerStore(tmp_path, 1000)
    digest, data = blob("a")
    assert store.put(digest, io.BytesIO(data), len(data)) is True
    assert store.put(digest, data, len(data)) is False  # already held: a hit, nothing rewritten
    assert store.has(digest) and store.size_of(digest) == 100 and store.holdings() == {digest}
    with store.open(digest) as f:
        assert f.read() == data
    with pytest.raises(ContainerError):
        store.open(blob("missing")[0])
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.used_bytes) == (2, 2, 100)


@pytest.mark.parametrize("claim", ["digest", "short", "long"])
def test_a_wrong_blob_is_refused_and_leaves_nothing(tmp_path, claim):
    store = LayerStore(tmp_path, 1000)
    digest, data = blob("a")
    if claim == "digest":
        args, match = (blob("b")[0], data, len(data)), "has digest"
    elif claim == "short":
        args, match = (digest, data, len(data) + 1), "bytes, not"
    else:
        args, match = (digest, io.BytesIO(data), len(data) - 1), "longer than its size"
    with pytest.raises(ContainerError, match=match):
        store.put(*args)
    assert store.holdings() == frozenset()
    assert not any((tmp_path / "blobs" / "sha256").iterdir()) and not any((tmp_path / "tmp").iterdir())


def test_bad_digest_form_is_refused(tmp_path):
    with pytest.raises(ContainerError, match="sha256:<64 hex>"):
        LayerStore(tmp_path, 1000).put("sha256:../../etc", b"", 0)


def test_eviction_keeps_under_budget_and_drops_least_recently_used(tmp_path):
    store = LayerStore(tmp_path, 300)
    a, b, c, d = (blob(t) for t in "abcd")
    for digest, data in (a, b, c):
        store.put(digest, data, 100)
    store.open(a[0]).close()  # a is now more recent than b and c
    store.put(*d, 100)
    assert store.holdings() == {a[0], c[0], d[0]}
    assert store.used_bytes() <= 300 and store.stats().evicted_bytes == 100


def test_pinned_blobs_are_never_evicted(tmp_path):
    store = LayerStore(tmp_path, 200)
    a, b, c = (blob(t) for t in "abc")
    store.put(*a, 100)
    store.put(*b, 100)
    with store.pin([a[0], b[0]]):
        with pytest.raises(ContainerError, match="no room"):
            store.put(*c, 100)
        assert store.holdings() == {a[0], b[0]}
    with store.pin([a[0]]):
        store.put(*c, 100)  # b goes, although a is older
    assert store.holdings() == {a[0], c[0]}


def test_lru_order_survives_a_restart(tmp_path):
    store = LayerStore(tmp_path, 300)
    a, b, c, d = (blob(t) for t in "abcd")
    for digest, data in (a, b, c):
        store.put(digest, data, 100)
    store.open(a[0]).close()
    reopened = LayerStore(tmp_path, 300)
    assert reopened.holdings() == {a[0], b[0], c[0]}
    reopened.put(*d, 100)
    assert reopened.holdings() == {a[0], c[0], d[0]}


def test_reopen_with_a_smaller_budget_evicts(tmp_path):
    store = LayerStore(tmp_path, 300)
    for t in "abc":
        store.put(*blob(t), 100)
    assert LayerStore(tmp_path, 150).used_bytes() == 100


def test_concurrent_puts_stay_consistent(tmp_path):
    store = LayerStore(tmp_path, 1000)
    blobs = [blob(str(i)) for i in range(20)]
    errors: list[Exception] = []

    def worker(chunk):
        try:
            for digest, data in chunk:
                store.put(digest, data, len(data))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(blobs[i::3],)) for i in range(3)]
    threads += [threading.Thread(target=worker, args=(blobs,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.used_bytes() <= 1000 and len(store.holdings()) == 10
