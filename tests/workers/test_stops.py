"""StopScanner: what a streaming client is shown always adds up to the final answer, and the
final answer is cut at the first stop string."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from permamesh.workers.stops import StopScanner

FFFD = "\ufffd"


def stream(text: str, stops, cuts=None, finish=True):
    """Feed growing prefixes of ``text`` (ending at ``cuts``, then the whole text), as the
    engine does after every token, then finish(). Return (scanner, released pieces)."""
    scanner = StopScanner(stops)
    ends = sorted(set(cuts or ())) + [len(text)]
    pieces = [scanner.feed(text[:end]) for end in ends if end > 0] if text else [scanner.feed("")]
    if finish:
        pieces.append(scanner.finish(text))
    return scanner, pieces


def test_a_stop_string_fed_char_by_char_is_never_shown():
    text = "Hello world<END>more"
    scanner, pieces = stream(text, ["<END>"], cuts=range(1, len(text)))
    assert "".join(pieces) == scanner.final_text == "Hello world"
    assert scanner.stopped
    assert all("<" not in p for p in pieces)


def test_nothing_more_is_released_after_the_stop():
    scanner = StopScanner(["<END>"])
    assert scanner.feed("ok<END>") == "ok"
    assert scanner.feed("ok<END> and more") == ""
    assert scanner.finish("ok<END> and more") == ""
    assert scanner.final_text == "ok"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=19), max_size=19))
def test_a_stop_string_fed_in_any_chunking_is_never_shown(cuts):
    text = "Hello world<END>more"
    scanner, pieces = stream(text, ["<END>"], cuts=cuts)
    assert "".join(pieces) == scanner.final_text == "Hello world"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=10), max_size=10))
def test_without_a_stop_finish_releases_everything(cuts):
    text = "Hello world"
    scanner, pieces = stream(text, ["<END>"], cuts=cuts)
    assert not scanner.stopped
    assert "".join(pieces) == scanner.final_text == text


def test_a_possible_start_of_a_stop_is_held_then_released_when_it_is_not_one():
    scanner = StopScanner(["abc"])
    assert scanner.feed("a") == ""
    assert scanner.feed("ab") == ""
    assert scanner.feed("abd") == "abd"
    assert scanner.finish("abd") == ""
    assert scanner.final_text == "abd"


def test_a_held_start_of_a_stop_is_dropped_when_it_becomes_the_stop():
    scanner = StopScanner(["abc"])
    assert scanner.feed("xab") == "x"
    assert scanner.feed("xabc") == ""
    assert scanner.final_text == "x"


def test_a_held_start_of_a_stop_is_released_by_finish():
    scanner = StopScanner(["abc"])
    assert scanner.feed("xab") == "x"
    assert scanner.finish("xab") == "ab"
    assert scanner.final_text == "xab"


def test_a_trailing_replacement_char_is_held_while_streaming():
    scanner = StopScanner([])
    assert scanner.feed("Hi" + FFFD) == "Hi"
    assert scanner.feed("Hi" + FFFD + FFFD) == ""
    assert scanner.feed("Hié") == "é"  # the UTF-8 sequence completed


def test_a_replacement_char_in_the_middle_is_released():
    scanner = StopScanner([])
    assert scanner.feed("a" + FFFD) == "a"
    assert scanner.feed("a" + FFFD + "b") == FFFD + "b"


def test_finish_strips_a_trailing_replacement_char():
    scanner = StopScanner([])
    assert scanner.feed("Hi" + FFFD) == "Hi"
    assert scanner.finish("Hi" + FFFD) == ""
    assert scanner.final_text == "Hi"
    assert not scanner.stopped


def test_finish_without_any_feed_releases_the_whole_answer():
    scanner = StopScanner(["x"])
    assert scanner.finish("abc" + FFFD + FFFD) == "abc"
    assert scanner.final_text == "abc"


@pytest.mark.parametrize("stops", [["<END>", "##"], ["##", "<END>"]])
@pytest.mark.parametrize("text,final", [("a##b<END>c", "a"), ("a<END>b##c", "a"), ("##<END>", ""), ("x<END##", "x<END")])
def test_the_earliest_of_several_stop_strings_wins(stops, text, final):
    for cuts in (range(1, len(text)), ()):
        scanner, pieces = stream(text, stops, cuts=cuts)
        assert scanner.final_text == final
        assert "".join(pieces) == final


def test_empty_stop_strings_are_ignored():
    scanner, pieces = stream("hello", ["", "zz"], cuts=range(1, 5))
    assert "".join(pieces) == scanner.final_text == "hello"
    assert not scanner.stopped


def test_a_stop_completed_by_a_multibyte_char_never_shows_its_start():
    scanner = StopScanner(["bé"])
    pieces = [scanner.feed("a"), scanner.feed("ab"), scanner.feed("ab" + FFFD), scanner.feed("abé")]
    assert scanner.stopped
    assert scanner.final_text == "a"
    assert "".join(pieces) == "a"


# ---------------------------------------------------------------------- properties

ALPHABET = "ab<>" + FFFD
texts = st.text(alphabet=ALPHABET, max_size=30)
stop_lists = st.lists(st.text(alphabet=ALPHABET, max_size=4), max_size=4)


def expected_final(text: str, stops, ends) -> str:
    """The first fed prefix that contains a stop ends generation; it is cut at the earliest
    occurrence. With no stop, the whole text without a trailing U+FFFD."""
    stops = [s for s in stops if s]
    for end in ends:
        prefix = text[:end]
        found = [prefix.find(s) for s in stops if s in prefix]
        if found:
            return prefix[: min(found)]
    return text.rstrip(FFFD)


@settings(max_examples=1000, deadline=None)
@given(text=texts, stops=stop_lists, cuts=st.lists(st.integers(min_value=1, max_value=30), max_size=30))
def test_released_pieces_always_add_up_to_the_final_text(text, stops, cuts):
    cuts = [c for c in cuts if c < len(text)]
    scanner, pieces = stream(text, stops, cuts=cuts)
    ends = sorted(set(cuts)) + [len(text)]
    assert "".join(pieces) == scanner.final_text
    assert scanner.final_text == expected_final(text, stops, ends)
    assert scanner.stopped == any(s and s in text[:e] for s in stops for e in ends)


@settings(max_examples=500, deadline=None)
@given(text=texts, stop=st.text(alphabet=ALPHABET, min_size=1, max_size=4),
       cuts=st.lists(st.integers(min_value=1, max_value=30), max_size=30))
def test_with_one_stop_string_the_answer_does_not_depend_on_the_chunking(text, stop, cuts):
    scanner, pieces = stream(text, [stop], cuts=[c for c in cuts if c < len(text)])
    want = text[: text.find(stop)] if stop in text else text.rstrip(FFFD)
    assert "".join(pieces) == scanner.final_text == want


@settings(max_examples=300, deadline=None)
@given(text=texts, stops=stop_lists)
def test_every_released_prefix_is_a_prefix_of_the_final_answer_char_by_char(text, stops):
    scanner = StopScanner(stops)
    shown = ""
    for end in range(1, len(text) + 1):
        shown += scanner.feed(text[:end])
        if scanner.stopped:
            break
    before_finish = shown
    shown += scanner.finish(text)
    assert scanner.final_text is not None
    assert scanner.final_text.startswith(before_finish)
    assert shown == scanner.final_text
