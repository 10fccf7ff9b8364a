"""The sampling workloads (greedy, defaults, t0.7-p0.9, penalties, t1.0, and the output controls json_schema and
logprobs), the prompts every mode sends (token ids for the model and the engine, texts for the service), and how
many requests a level sends."""
from __future__ import annotations

import functools
import random
from typing import Optional

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
    "json_schema": workload(0.3),  # the docs' defaults, with CONTROLS' fields below
    "logprobs": workload(0.3),
    "defaults-json-len": workload(0.3),  # the docs' defaults, each request as long as json_schema's (LENGTH_OF)
}

# The output controls (issue 15): the docs' defaults plus request fields beyond sampling, each compared with the
# `defaults` row of its series and concurrency (x defaults: the cost of the control over unconstrained sampling).
# JSON_SCHEMA's strings, array and integer are bounded, so that every reply ends (finish "stop": its JSON is
# complete) well inside --output-len: such a row produces fewer tokens than --output-len, and is counted as such.
JSON_SCHEMA = {"type": "object",
               "properties": {"name": {"type": "string", "maxLength": 16},
                              "age": {"type": "integer", "minimum": 0, "maximum": 150},
                              "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4}},
               "required": ["name", "age", "tags"], "additionalProperties": False}
TOP_LOGPROBS = 5
# The request body's fields (the service's clients send them as they are).
CONTROLS = {
    "json_schema": dict(response_format={"type": "json_schema",
                                         "json_schema": {"name": "person", "schema": JSON_SCHEMA}}),
    "logprobs": dict(logprobs=True, top_logprobs=TOP_LOGPROBS),
}
GRAMMAR_WORKLOADS = ("json_schema",)  # rows that end when their grammar is complete, before --output-len
# A json_schema row's requests are shorter than --output-len, so its prefills weigh more per output token and the
# closed loop turns requests over more often: costs of the length, not of the grammar. Its unconstrained twin
# runs right after it: the docs' defaults, request i of a level with max_tokens = the tokens json_schema's
# request i of that level (same round) produced. json_schema over it is the grammar's own cost; it over
# defaults (its x defaults) is the length's.
LENGTH_OF = {"defaults-json-len": "json_schema"}
BASELINES = {name: "defaults" for name in (*CONTROLS, *LENGTH_OF)}  # x defaults: over their series' defaults row

DEFAULT_SAMPLING = ("greedy", "defaults", "t0.7-p0.9", "penalties", "json_schema", "defaults-json-len",
                    "logprobs")  # the engine modes' rows
DEFAULT_SERVICE_SDK_SAMPLING = ("t1.0",)
# The service's --service-client rows at the highest level, beside its greedy rows at every level.
DEFAULT_SERVICE_SAMPLING = ("defaults", "json_schema", "defaults-json-len", "logprobs")
GREEDY = "greedy"


def request_fields(name: str) -> dict:
    """The chat request's fields of a workload (the service's clients): sampling, then the output controls."""
    return {**SAMPLING[name], **CONTROLS.get(name, {})}


@functools.lru_cache(maxsize=None)
def grammar_of(name: str) -> Optional[str]:
    """A workload's llguidance grammar (compiled as the API compiles response_format), None without one."""
    response_format = CONTROLS.get(name, {}).get("response_format")
    if response_format is None:
        return None
    from jobs.structured_output import grammar_for
    return grammar_for(response_format)


def engine_fields(name: str) -> dict:
    """EngineRequest's arguments beyond sampling for a workload, as the worker maps the request's fields
    (workers/job_runner.py): grammar, and logprobs = top_logprobs when logprobs is asked."""
    controls = CONTROLS.get(name, {})
    return dict(grammar=grammar_of(name),
                logprobs=controls.get("top_logprobs", 0) if controls.get("logprobs") else None)

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
    for twin, source in LENGTH_OF.items():
        if twin in names and (source not in names or names.index(source) > names.index(twin)):
            raise SystemExit(f"{option}: {twin} takes its lengths from {source}: name {source} before it")
    return names


def output_lengths(name: str, out_len: int, produced: dict[str, list[int]]) -> list[int] | int:
    """max_tokens of a level's requests: --output-len, or for a twin (LENGTH_OF) per request i the tokens its
    source's request i produced at this level (`produced`: workload -> tokens per request, this level and
    round), at least 1."""
    source = LENGTH_OF.get(name)
    if source is None:
        return out_len
    if source not in produced:
        raise RuntimeError(f"{name}: no {source} row ran at this level before it")
    return [max(1, n) for n in produced[source]]


def max_tokens_of(out_len: list[int] | int, i: int) -> int:
    return out_len[i % len(out_len)] if isinstance(out_len, list) else out_len


def describe(name: str) -> str:
    """A workload's settings, those not at OpenAI's neutral value: `temperature 0.7, top_p 0.9`; then its output
    controls: `response_format json_schema (name, age, tags)`, `logprobs, top_logprobs 5`."""
    neutral = dict(temperature=None, top_p=1.0, frequency_penalty=0.0, presence_penalty=0.0)
    parts = [f"{k} {v:g}" for k, v in SAMPLING[name].items() if v != neutral[k]]
    controls = CONTROLS.get(name, {})
    if "response_format" in controls:
        spec = controls["response_format"]
        schema = spec.get("json_schema", {}).get("schema") or {}
        parts.append(f"response_format {spec['type']}" + (f" ({', '.join(schema['properties'])})"
                                                           if schema.get("properties") else ""))
    if controls.get("logprobs"):
        parts.append("logprobs" + (f", top_logprobs {controls['top_logprobs']}" if controls.get("top_logprobs")
                                   else ""))
    if name in LENGTH_OF:
        parts.append(f"max_tokens of request i = the tokens {LENGTH_OF[name]}'s request i produced")
    return ", ".join(parts)


def workload_meta(name: str) -> dict:
    """A workload for the JSON: its sampling settings, its output controls, its baseline."""
    return dict(SAMPLING[name], **CONTROLS.get(name, {}),
                **({"baseline": BASELINES[name]} if name in BASELINES else {}),
                **({"lengths_of": LENGTH_OF[name]} if name in LENGTH_OF else {}))
