"""Incremental detokenisation and stop strings: pieces concatenate to the full text; stops never leak."""

from __future__ import annotations

import pytest

from server.text_stream import IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


@pytest.mark.parametrize(
    "text", ["Hello world, how are you?", "naïve café — 日本語のテキスト 🎉🎉 ok", "  spaces\n\nnewlines"]
)
def test_pieces_concatenate_to_decoded_text(tokenizer, text: str) -> None:
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.push(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_emoji_split_across_tokens_is_held_back(tokenizer) -> None:
    ids = tokenizer("🎉", add_special_tokens=False).input_ids
    assert len(ids) > 1  # byte-level BPE splits the emoji; the test needs that
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "🎉"


def test_a_character_the_request_ended_inside_of_is_left_out(tokenizer) -> None:
    """max_tokens cut an emoji's bytes: the text ends before it, not with U+FFFD (which the model never wrote)."""
    ids = tokenizer("ok 🎉", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, [])
    pieces = [detok.push(t) for t in ids[:-1]]
    assert "".join(pieces) + detok.flush() == "ok "


def test_stray_bytes_are_not_held_for_ever(tokenizer) -> None:
    """A model writing lone continuation bytes (no character ever completes): each is held only a few tokens,
    so the window decoded each step stays short (it grew with the output: quadratic), and the pieces still add
    up to the decoded text."""

    class Counting:
        decoded = 0

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            Counting.decoded += len(ids)
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    stray = tokenizer.convert_tokens_to_ids("\u00a2")  # byte 0xA2 alone: a continuation byte
    detok = IncrementalDetokenizer(Counting(), [])
    pieces = [detok.push(stray) for _ in range(2000)]
    pieces.append(detok.flush())
    joined, decoded = "".join(pieces), tokenizer.decode([stray] * 2000)
    assert decoded.startswith(joined) and set(decoded[len(joined) :]) <= {"\ufffd"}  # but what flush left out
    assert len(joined) >= 2000 - 8
    assert Counting.decoded < 2000 * 40, Counting.decoded  # held back without bound: ~2000 * 2000


def test_stop_string_completed_across_pieces() -> None:
    stop = StopMatcher(["END"])
    assert stop.feed("abc E") == ("abc ", False)  # "E" might start END: held back
    assert stop.feed("N") == ("", False)
    assert stop.feed("D tail") == ("", True)


def test_held_back_text_released_when_stop_does_not_complete() -> None:
    stop = StopMatcher(["END", "###"])
    assert stop.feed("x EN") == ("x ", False)
    assert stop.feed("O more #") == ("ENO more ", False)
    assert stop.flush() == "#"


def test_earliest_stop_wins_and_no_stop_passes_through() -> None:
    assert StopMatcher(["b", "a"]).feed("xxab") == ("xx", True)
    assert StopMatcher([]).feed("anything") == ("anything", False)


def test_an_included_stop_string_ends_the_text() -> None:
    stop = StopMatcher(["END", "N"], include=True)
    assert stop.feed("abc E") == ("abc ", False)
    assert stop.feed("ND tail") == ("END", True)  # "END" starts first (before its own "N"), and stays
    assert StopMatcher(["b", "a"], include=True).feed("xxab") == ("xxa", True)


def test_stop_strings_are_not_matched_until_asked_and_then_only_in_new_text() -> None:
    """min_tokens: while matching is off the text passes (a tail that may start a stop string still held);
    a stop string straddling the moment it turns on is found, one whole before it is not (vLLM's rule)."""
    stop = StopMatcher(["END", "b"])
    assert stop.feed("a, b, E", match=False) == ("a, b, ", False)  # "b" not matched; "E" held back
    assert stop.feed("ND", match=True) == ("", True)  # "END" straddles: found
    late = StopMatcher(["abc", "b"])
    assert late.feed("xab", match=False) == ("x", False)  # "ab" held: it may start "abc"; its "b" came too soon
    assert late.feed("d") == ("abd", False)
    assert late.feed("b") == ("", True)
