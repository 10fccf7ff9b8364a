"""Token ids -> the text a client sees: incremental detokenizing, then stop-sequence matching."""
from __future__ import annotations

from typing import Optional

from workers.text.detokenizer import IncrementalDetokenizer
from workers.text.stop_matcher import StopMatcher


class TextAssembler:
    def __init__(self, tokenizer, stop: list[str]):
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = StopMatcher(stop)
        self.eos_id = tokenizer.eos_id
        self.text = ""                             # everything emitted so far
        self.token_count = 0                       # completion tokens: those read until the end, EOS included
        self.done = False                          # no more text will come
        self.finish_reason: Optional[str] = None   # "stop" once a stop sequence or EOS ended the text

    def feed(self, token_ids: list[int]) -> str:
        """Returns the newly emitted text. Tokens after a stop sequence or EOS are ignored."""
        emitted = []
        for token_id in token_ids:
            if self.done:
                break
            self.token_count += 1
            if token_id == self.eos_id:  # EOS ends the text; it is not part of it
                emitted.append(self._release_held())
                self.finish_reason = "stop"
                break
            piece, matched = self._stop.feed(self._detokenizer.feed(token_id))
            emitted.append(piece)
            if matched:
                self.done, self.finish_reason = True, "stop"
        return self._emit("".join(emitted))

    def finish(self) -> str:
        """At the end of generation: release text held back for a stop that never completed."""
        return "" if self.done else self._emit(self._release_held())

    def _release_held(self) -> str:
        piece, matched = self._stop.feed(self._detokenizer.flush())
        self.done = True
        if matched:
            self.finish_reason = "stop"
            return piece
        return piece + self._stop.flush()

    def _emit(self, piece: str) -> str:
        self.text += piece
        return piece
