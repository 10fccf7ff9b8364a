"""The tokenizer's vocabulary as bytes: what each token id adds to the output, for logprobs (`bytes`, `token`)
and for the constrained decoder (llguidance reads a vocabulary as one byte string per token).

Mistral's v1 SentencePiece: "▁" is a space, byte-fallback pieces `<0xNN>` are the byte NN, and the control
tokens (<unk>, <s>, </s>) add no text. Free of torch: the API, the worker and the engine process all use it.
"""
from __future__ import annotations

import functools
import re

from jobs.chat_format import raw_tokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def piece_bytes(piece: str) -> bytes:
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


@functools.lru_cache(maxsize=1)
def token_bytes() -> tuple[bytes, ...]:
    """The bytes of every token id (b"" for the control tokens)."""
    tokenizer = raw_tokenizer()
    special = set(special_ids())
    return tuple(b"" if i in special else piece_bytes(tokenizer.id_to_piece(i)) for i in range(tokenizer.n_words))


@functools.lru_cache(maxsize=1)
def special_ids() -> tuple[int, ...]:
    tokenizer = raw_tokenizer()
    return tuple(i for i in (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) if i is not None and i >= 0)


def vocab_size() -> int:
    return raw_tokenizer().n_words


def token_text(data: bytes) -> str:
    """A token's text as OpenAI shows it in logprobs: its UTF-8, or for part of a character "bytes:\\xNN..."."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def logprob_entry(token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict:
    """One entry of OpenAI's choices[].logprobs.content: {token, logprob, bytes, top_logprobs}."""
    def described(token: int, value: float) -> dict:
        data = token_bytes()[token] if 0 <= token < len(token_bytes()) else b""
        return {"token": token_text(data), "logprob": value, "bytes": list(data)}

    return {**described(token_id, logprob), "top_logprobs": [described(t, v) for t, v in top]}
