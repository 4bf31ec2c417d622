"""Chained block hashing: how prompts and images become routing keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from permamesh.errors import PermameshError
from permamesh.routing import DIGEST_SIZE, BlockHasher, RoutingError, chain_digests

SYSTEM_PROMPT = list(range(100, 132))  # two blocks of 16 tokens


def test_two_prompts_with_one_system_prompt_share_exactly_its_blocks() -> None:
    hasher = BlockHasher()
    alice = hasher.chain(SYSTEM_PROMPT + [7] * 16 + [8] * 16)
    bob = hasher.chain(SYSTEM_PROMPT + [9] * 16)

    assert len(alice) == 4 and len(bob) == 3
    assert alice[:2] == bob[:2]
    assert alice[2] != bob[2]
    assert all(len(d) == DIGEST_SIZE for d in alice + bob)


def test_a_digest_commits_to_everything_before_it() -> None:
    hasher = BlockHasher(block_size=2)
    # Same second block, different first block: the second digests differ too.
    assert hasher.chain([1, 2, 5, 6])[1] != hasher.chain([3, 4, 5, 6])[1]
    # A repeated block gets a new digest at each position.
    a, b = hasher.chain([5, 6, 5, 6])
    assert a != b


def test_a_trailing_partial_block_is_ignored() -> None:
    hasher = BlockHasher(block_size=4)
    full = hasher.chain([1, 2, 3, 4, 5, 6, 7, 8])
    assert hasher.chain([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]) == full
    assert hasher.chain([1, 2, 3]) == []
    assert hasher.chain([]) == []


def test_trust_domains_get_unrelated_chains() -> None:
    tokens = list(range(64))
    plain = BlockHasher().chain(tokens)
    red = BlockHasher(salt=b"red team").chain(tokens)
    blue = BlockHasher(salt=b"blue team").chain(tokens)
    assert len(plain) == len(red) == len(blue) == 4
    assert not set(plain) & set(red) and not set(red) & set(blue) and not set(plain) & set(blue)
    assert BlockHasher(salt=b"red team").chain(tokens) == red


def test_block_size_is_part_of_the_name() -> None:
    tokens = list(range(8))
    assert BlockHasher(block_size=4).chain(tokens)[0] != BlockHasher(block_size=8).chain(tokens)[0]


@pytest.mark.parametrize("size", [0, -1, True, 2.0, "16", None])
def test_a_bad_block_size_is_rejected(size: object) -> None:
    with pytest.raises(RoutingError):
        BlockHasher(block_size=size)  # type: ignore[arg-type]


@pytest.mark.parametrize("salt", ["text", bytes(65), bytearray(b"x")])
def test_a_bad_salt_is_rejected(salt: object) -> None:
    with pytest.raises(RoutingError):
        BlockHasher(salt=salt)  # type: ignore[arg-type]
    with pytest.raises(RoutingError):
        chain_digests([b"layer"], salt=salt)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "7", None, True])
def test_a_bad_token_is_rejected_even_in_the_ignored_tail(bad: object) -> None:
    hasher = BlockHasher(block_size=2)
    with pytest.raises(RoutingError, match="token 2"):
        hasher.chain([1, 2, bad])  # type: ignore[list-item]
    with pytest.raises(PermameshError):
        hasher.chain([bad, 1])  # type: ignore[list-item]


def test_token_range_edges_are_accepted() -> None:
    assert len(BlockHasher(block_size=2).chain([0, 2**32 - 1])) == 1


def test_image_layers_chain_like_blocks() -> None:
    base = [b"sha256:" + bytes([i]) * 32 for i in range(3)]
    python_image = chain_digests(base + [b"sha256:python"])
    node_image = chain_digests(base + [b"sha256:node"])
    assert len(python_image) == 4
    assert python_image[:3] == node_image[:3] and python_image[3] != node_image[3]
    assert chain_digests(base, salt=b"tenant") != chain_digests(base)
    assert chain_digests([]) == []


def test_layer_chains_are_unambiguous_and_separate_from_token_chains() -> None:
    assert chain_digests([b"ab", b"c"])[-1] != chain_digests([b"a", b"bc"])[-1]
    assert chain_digests([b""]) != chain_digests([b"\x00"])
    # One token block and one layer with the same bytes still get different names.
    token_block = (7).to_bytes(4, "little")
    assert BlockHasher(block_size=1).chain([7]) != chain_digests([token_block])


@pytest.mark.parametrize("item", ["layer", bytearray(b"x"), 3])
def test_a_layer_that_is_not_bytes_is_rejected(item: object) -> None:
    with pytest.raises(RoutingError, match="item 1"):
        chain_digests([b"ok", item])  # type: ignore[list-item]


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=40),
    extra=st.lists(st.integers(0, 2**32 - 1), max_size=40),
    size=st.integers(1, 6),
)
def test_chains_of_extended_prompts_extend(tokens: list[int], extra: list[int], size: int) -> None:
    hasher = BlockHasher(block_size=size)
    short = hasher.chain(tokens)
    long = hasher.chain(tokens + extra)
    assert len(short) == len(tokens) // size
    assert len(long) == (len(tokens) + len(extra)) // size
    assert long[: len(short)] == short


@given(
    a=st.lists(st.integers(0, 3), max_size=12),
    b=st.lists(st.integers(0, 3), max_size=12),
    size=st.integers(1, 3),
)
def test_equal_digests_mean_equal_prefixes(a: list[int], b: list[int], size: int) -> None:
    hasher = BlockHasher(block_size=size)
    for i, (x, y) in enumerate(zip(hasher.chain(a), hasher.chain(b))):
        assert (x == y) == (a[: (i + 1) * size] == b[: (i + 1) * size])
