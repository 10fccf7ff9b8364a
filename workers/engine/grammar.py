"""Constrained decoding: each constrained row's llguidance matcher says which tokens may come next, as a bitmask;
a step fills the masks of all its constrained rows on a thread of their own while the model computes the step,
moves them in one copy, and sets every token a row may not take to -inf before sampling. After sampling, each
matcher consumes its row's token; a matcher that can go no further (its JSON is complete) ends the row with "stop".

Matchers are built in `submit` (from the grammar that jobs/structured_output.py compiled at the API), never on
the decode loop. The vocabulary they read is jobs/vocabulary.py's.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import llguidance
import torch

from jobs import vocabulary
from workers.engine import cpu_kernels


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads from a tokenizer: token bytes, special ids, and encode().

    encode() is a greedy longest match over the token bytes, not SentencePiece's own: SentencePiece adds a
    space before a text's first piece, so its tokens of a fragment would not decode to the fragment, which
    llguidance requires (it tokenizes fragments of the output to force bytes)."""

    def __init__(self):
        from jobs.chat_format import raw_tokenizer

        tokenizer = raw_tokenizer()
        self.eos_token_id = tokenizer.eos_id  # the tokenizer's own (an engine may be told to ignore EOS: -1)
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = list(vocabulary.special_ids())
        pieces = vocabulary.token_bytes()
        names = {i: tokenizer.id_to_piece(i) for i in self.special_token_ids}
        # llguidance marks a special token by a leading 0xFF byte (no text token starts with it).
        self.tokens = [b"\xff" + names[i].encode() if i in names else data for i, data in enumerate(pieces)]
        self._ids: dict[bytes, int] = {}
        for i, data in enumerate(pieces):
            if data and i not in names:
                self._ids.setdefault(data, i)
        self._longest = max(map(len, self._ids))

    def __call__(self, text) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        ids, at = [], 0
        while at < len(data):
            for length in range(min(self._longest, len(data) - at), 0, -1):
                token = self._ids.get(data[at:at + length])
                if token is not None:
                    ids.append(token)
                    at += length
                    break
            else:  # (every single byte is a token: byte fallback)
                raise ValueError(f"no token for byte {data[at]:#x}")
        return ids


class GrammarSupport:
    def __init__(self, vocab_size: int, max_rows: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self._lock = threading.Lock()
        self._tokenizer: Optional[llguidance.LLTokenizer] = None
        # [rows, ceil(V / 32)] int32: bit j of word w allows token 32 w + j (llguidance's layout)
        shape = (max_rows, (vocab_size + 31) // 32)
        self.host_masks = torch.zeros(shape, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._bits = torch.arange(32, dtype=torch.int32, device=device)  # [32]
        # One thread: a step's fill never overlaps the previous one's (they share host_masks).
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:  # built once, on the first constrained request (a fraction of a second)
            if self._tokenizer is None:
                if vocabulary.vocab_size() != self.vocab_size:
                    raise ValueError(f"constrained decoding needs the tokenizer's vocabulary "
                                     f"({vocabulary.vocab_size()} tokens); the model has {self.vocab_size}")
                wrapper = llguidance.TokenizerWrapper(_Vocabulary())
                self._tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self.vocab_size)
            return self._tokenizer

    def matcher(self, grammar: str, generated: Sequence[int] = ()) -> llguidance.LLMatcher:
        """A request's matcher, having consumed the tokens it already generated (a resumed job's). Raises
        ValueError with the reason if the grammar or those tokens are refused."""
        try:
            matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        except ValueError:
            raise
        except Exception as exc:  # whatever the library raises: the request fails, the caller goes on
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc
        if generated and not matcher.consume_tokens(list(generated)):
            raise ValueError(f"the resumed tokens do not fit the grammar: {matcher.get_error()}")
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def fill_async(self, matchers: list[llguidance.LLMatcher]) -> Optional[Future]:
        """Start filling the masks of a step's constrained rows (in its order), on the grammar thread: it runs
        while the model computes the step, and apply_ waits for it."""
        if not matchers:
            return None
        return self._filler.submit(self._fill, matchers)

    def _fill(self, matchers: list[llguidance.LLMatcher]) -> None:
        # One matcher at a time: llguidance drops the GIL while it computes one mask, so the model's Python runs
        # meanwhile. Its batched fill (LLExecutor, a thread pool) holds the GIL while it waits for its pool: on
        # 2 cores it made the model's step 1 ms slower at 32 constrained rows, and this loop does not.
        # The matcher writes row i in place. Not through llguidance.torch's helper (the same call): importing that
        # module imports torch._dynamo, about 4 s of every engine process's start here.
        for i, matcher in enumerate(matchers):
            row = self.host_masks[i]  # contiguous: a row of a contiguous tensor
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def apply_(self, logits: torch.Tensor, rows: list[int], filled: Future) -> None:
        """logits [S, V] float32: every token the i-th constrained row's matcher forbids at rows[i] becomes
        -inf, once fill_async's masks are done."""
        filled.result()
        masks = self.host_masks[:len(rows)]
        index = torch.tensor(rows, device=self.device)
        if cpu_kernels.apply_token_mask_(logits, index, masks):  # on the CPU: one pass over the packed words
            return
        words = masks.to(self.device, non_blocking=True)                              # [R, W] int32
        allowed = ((words.unsqueeze(2) >> self._bits) & 1).view(len(rows), -1)[:, :self.vocab_size]  # [R, V]
        logits[index] = logits[index].masked_fill_(allowed == 0, float("-inf"))

    @staticmethod
    def consume(matcher: llguidance.LLMatcher, token: int) -> Optional[str]:
        """After sampling: the matcher takes the token. Returns "stop" when the grammar is complete (nothing can
        follow), "error" when the matcher refused the token, else None."""
        if not matcher.consume_token(token):
            return "error"
        return "stop" if matcher.is_stopped() else None
