from __future__ import annotations

import random

from workers.text.stop_matcher import StopMatcher


def _run(stop: list[str], chunks: list[str]) -> tuple[list[str], bool, str]:
    """Feed chunks until a stop; return (emitted pieces, stopped, flushed)."""
    m = StopMatcher(stop)
    out: list[str] = []
    for c in chunks:
        text, stopped = m.feed(c)
        out.append(text)
        if stopped:
            return out, True, m.flush()
    return out, False, m.flush()


def test_stop_spanning_chunks() -> None:
    m = StopMatcher(["ab"])
    assert m.feed("a") == ("", False)  # "a" could start "ab": held
    assert m.feed("b") == ("", True)
    assert m.flush() == ""


def test_stop_spanning_chunks_with_text_around() -> None:
    out, stopped, _ = _run(["<END>"], ["hello <E", "N", "D> bye"])
    assert stopped and "".join(out) == "hello "
    assert out[0] == "hello "  # only "<E" was held


def test_stop_at_start() -> None:
    assert _run(["Hi"], ["Hi there"]) == ([""], True, "")


def test_earliest_stop_wins() -> None:
    out, stopped, _ = _run(["world", "lo"], ["hello world"])
    assert stopped and out == ["hel"]
    # Both complete in the same feed: "abcd" starts first, so everything is cut.
    out, stopped, _ = _run(["c", "abcd"], ["ab", "cd"])
    assert stopped and "".join(out) == ""
    # Only "c" is complete ("abcx" is not): cut at "c".
    out, stopped, _ = _run(["c", "abcx"], ["ab", "cd"])
    assert stopped and "".join(out) == "ab"


def test_partial_prefix_released_when_it_stops_matching() -> None:
    m = StopMatcher(["ab"])
    assert m.feed("a") == ("", False)
    assert m.feed("x") == ("ax", False)


def test_nothing_held_when_no_tail_is_a_prefix() -> None:
    m = StopMatcher(["stop", "END"])
    assert m.feed("hello") == ("hello", False)
    assert m.feed(" sto") == (" ", False)  # longest tail that is a prefix of "stop"
    assert m.feed("ck") == ("stock", False)


def test_holds_longest_prefix_tail_only() -> None:
    m = StopMatcher(["aab"])
    assert m.feed("xaa") == ("x", False)
    assert m.feed("a") == ("a", False)  # "aaa": only "aa" can still start "aab"
    assert m.feed("b") == ("", True)


def test_flush_returns_held_text() -> None:
    m = StopMatcher(["###"])
    assert m.feed("answer ##") == ("answer ", False)
    assert m.flush() == "##"
    assert m.flush() == ""


def test_stop_in_middle_of_chunk_truncates() -> None:
    m = StopMatcher(["\n\n"])
    assert m.feed("line one\n\nline two") == ("line one", True)
    assert m.stopped
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_empty_stop_list_emits_immediately() -> None:
    m = StopMatcher([])
    assert m.feed("a") == ("a", False)
    assert m.feed("") == ("", False)
    assert m.flush() == ""
    assert StopMatcher([""]).feed("abc") == ("abc", False)  # empty strings ignored


def _expected_hold(fed: str, stops: list[str]) -> int:
    """Brute force: longest suffix of ``fed`` that is a proper prefix of some stop."""
    lengths = [n for n in range(1, len(fed) + 1) if any(len(s) > n and s.startswith(fed[-n:]) for s in stops)]
    return max(lengths, default=0)


def test_random_chunkings_match_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(1000):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]

        m = StopMatcher(stops)
        fed, emitted, stopped = "", "", False
        for chunk in chunks:
            fed += chunk
            piece, stopped = m.feed(chunk)
            emitted += piece
            if stopped:
                break
            assert fed.startswith(emitted)
            assert len(fed) - len(emitted) == _expected_hold(fed, stops)
        if stopped:
            # First time a stop is complete in the stream: cut at its earliest start.
            cut = min(fed.find(s) for s in stops if s in fed)
            assert emitted == fed[:cut] and m.flush() == ""
        else:
            assert not any(s in text for s in stops)
            assert emitted + m.flush() == text
