"""Incremental (streaming) detokenization for SentencePiece tokenizers.

Goal: ``"".join(feed(i) for i in ids) + flush() == tokenizer.decode(ids)``,
without re-decoding the whole sequence per token and without ever emitting
half of a UTF-8 character.

How ``decode`` behaves (mistral-common, SpecialTokenPolicy.IGNORE, checked on v1):
- it is a concatenation of per-piece text, except that consecutive byte-fallback
  pieces (``<0xNN>``) are joined and UTF-8 decoded together, each byte of an
  invalid/incomplete sequence becoming one U+FFFD;
- control tokens (bos=1, eos=2) decode to "" and are skipped entirely;
- the leading "▁" (space) of the first non-control piece is dropped; byte and
  <unk> (" ⁇ ") pieces also count as "first piece" but have no "▁" to drop.

Window scheme (as in vLLM/TGI): keep two offsets into the token list.
``ids[prefix:read]`` was already emitted; decoding ``ids[prefix:]`` and removing
the text of ``ids[prefix:read]`` gives the new text. New text is only emitted
(and offsets advanced) when it does not end in U+FFFD, i.e. when the byte
decoder is at a character boundary, so windows never split a character.

Leading-space quirk: a window starting mid-sequence would have the "▁" of its
first piece dropped. So once ``prefix > 0`` (text has been emitted, hence the
first piece is behind us) every window is decoded after an anchor byte token
("A"), which plays the role of the first piece; its text is then sliced off.
"""
from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"


class SentencePieceLike(Protocol):
    def decode(self, tokens: list[int]) -> str: ...
    def id_to_piece(self, token_id: int) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: SentencePieceLike) -> None:
        self._tok = tokenizer
        self._anchor = self._find_anchor()  # [1] id of the "<0x41>" byte piece
        self._anchor_len = len(tokenizer.decode(self._anchor))  # == len("A") == 1
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids[:read] have been emitted
        self._prefix_text = ""  # text of ids[prefix:read] as decoded in a window

    def _find_anchor(self) -> list[int]:
        # Byte-fallback pieces <0x00>..<0xFF> are ids 3..258 in Mistral vocabularies;
        # verify rather than assume. A complete ASCII byte never merges with later bytes.
        guess = 3 + 0x41
        if self._tok.id_to_piece(guess) == "<0x41>" and self._tok.decode([guess]) == "A":
            return [guess]
        raise ValueError("tokenizer has no byte-fallback piece <0x41> at id 68")

    def _decode_window(self, start: int, end: int) -> str:
        """Text contributed by ids[start:end], as if preceded by the ids before it."""
        if start == 0:
            return self._tok.decode(self._ids[:end])  # true sequence start: quirk applies
        return self._tok.decode(self._anchor + self._ids[start:end])[self._anchor_len :]

    def feed(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        full = self._decode_window(self._prefix, len(self._ids))
        if len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT):
            return ""  # nothing new, or a multi-byte character is still incomplete
        delta = full[len(self._prefix_text) :]
        # Slide the window: the tokens just emitted become the new prefix. Their text in the new window is
        # `delta` itself: the window before them ends on a character boundary (it was emitted), pieces
        # decode independently across such a boundary, and the anchor stands in for what came before.
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = delta
        return delta

    def flush(self) -> str:
        """End of sequence: return held text (e.g. U+FFFD for dangling bytes)."""
        full = self._decode_window(self._prefix, len(self._ids))
        rest = full[len(self._prefix_text) :]
        if rest:  # only move past text-producing tokens (keeps the anchor rule valid)
            self._prefix, self._read = len(self._ids), len(self._ids)
            self._prefix_text = ""
        return rest

    @property
    def token_ids(self) -> list[int]:
        """All ids fed so far (a copy)."""
        return list(self._ids)
