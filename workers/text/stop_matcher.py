"""Streaming stop-sequence matching on decoded text.

Text arrives in chunks (one per decoded token). A stop string may span chunks,
so the matcher holds back the shortest amount of text that could still turn
into a stop: exactly the longest tail of the pending text that is a proper
prefix of some stop string. Everything before that tail is safe to emit.
"""
from __future__ import annotations


class StopMatcher:
    """Feed decoded chunks; get back (safe_text, stopped).

    - The emitted text never contains a stop string or anything after it.
    - If several stop strings occur in the pending text, the one starting
      earliest wins (ties start at the same place, so they truncate equally).
    - Empty stop strings are ignored (they would match before any text).
    - After a stop, ``feed`` returns ("", True) and ``flush`` returns "".
    """

    def __init__(self, stop: list[str]) -> None:
        self._stops: list[str] = [s for s in dict.fromkeys(stop) if s]  # dedup, keep order
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""  # held text: always a proper prefix of some stop string
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        buf = self._pending + text
        # Any stop that could have started in already-emitted text would have made
        # that text part of the held tail, so searching ``buf`` alone is enough.
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            self._stopped = True
            return buf[:cut], True
        hold = self._held_tail_len(buf)
        self._pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """End of generation without a stop: release whatever is held."""
        held, self._pending = self._pending, ""
        return held

    def _held_tail_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop."""
        for n in range(min(len(buf), self._max_hold), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
