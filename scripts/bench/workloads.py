"""The sampling workloads (greedy, defaults, t0.7-p0.9, penalties, t1.0), the prompts every mode sends (token ids
for the model and the engine, texts for the service), and how many requests a level sends."""
from __future__ import annotations

import random

import torch


def workload(temperature: float, top_p: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0) -> dict:
    """A workload's settings, every field spelled out (for the JSON). OpenAI's names: they are both the request
    body's fields and SamplingParams' arguments."""
    return dict(temperature=temperature, top_p=top_p, frequency_penalty=frequency_penalty,
                presence_penalty=presence_penalty)


# The sampling workloads (--sampling). `defaults` is what a request gets when it names no sampling field
# (app/protocol.py); the speed claims name one of these.
SAMPLING = {
    "greedy": workload(0.0),
    "defaults": workload(0.3),
    "t0.7-p0.9": workload(0.7, top_p=0.9),
    "penalties": workload(0.3, frequency_penalty=0.5, presence_penalty=0.5),
    "t1.0": workload(1.0),
}
DEFAULT_SAMPLING = ("greedy", "defaults", "t0.7-p0.9", "penalties")  # the engine modes' rows
DEFAULT_SERVICE_SDK_SAMPLING = ("t1.0",)
GREEDY = "greedy"

PROMPT_SEED = 1234
# Plain words for the service's text prompts (most are one token each for the Mistral tokenizer).
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will can more other time "
         "some what only into could may then first any new these two like do over such our man me even most "
         "made after also did many before must through back years where much your way well down should because "
         "each just those people how too little state good very make world still own see men work long get here "
         "between both life being under never day same another know while last might us great old year off come "
         "since against go came right used take three").split()


def token_prompts(count: int, length: int) -> list[list[int]]:
    """Deterministic random token ids in [100, 32000)."""
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(100, 32000, (count, length), generator=generator).tolist()


def text_prompts(count: int, length: int) -> list[str]:
    """Deterministic texts whose chat-formatted prompt (the API's tokenization) is about `length` tokens."""
    from jobs.chat_format import Message, encode_conversation

    def tokens(words: list[str]) -> int:
        return len(encode_conversation([Message("user", " ".join(words))]))

    texts = []
    for i in range(count):
        rng = random.Random(PROMPT_SEED + i)
        pool = [f"Request {i}:"] + [rng.choice(WORDS) for _ in range(2 * length + 16)]
        n = max(1, length - 8)
        for _ in range(12):  # a few corrections by the difference converge (words are ~1 token each)
            diff = length - tokens(pool[:n])
            if diff == 0:
                break
            n = min(len(pool), max(1, n + diff))
        texts.append(" ".join(pool[:n]))
    return texts


def requests_per_level(args, c: int) -> int:
    return max(args.waves * c, args.num_prompts)


def workload_names(text: str, option: str) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))  # once each, in order
    unknown = [name for name in names if name not in SAMPLING]
    if unknown:
        raise SystemExit(f"{option}: unknown workload(s) {unknown}; choose from {','.join(SAMPLING)}")
    return names


def describe(settings: dict) -> str:
    """A workload's settings, those not at OpenAI's neutral value: `temperature 0.7, top_p 0.9`."""
    neutral = dict(temperature=None, top_p=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    return ", ".join(f"{k} {v:g}" for k, v in settings.items() if v != neutral[k])
