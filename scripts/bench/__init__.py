"""Serving benchmark: what `vllm bench serve` reports (TTFT, TPOT, ITL as mean/p50/p99, output tokens/s,
requests/s), over a sweep of concurrency levels, for five ways of generating with the same model:

  hf_generate        Hugging Face `model.generate()`, one request at a time (the baseline): for concurrency c,
                     c requests back to back (at most --hf-max-requests: 8 on CPU, 4 on CUDA); tokens
                     timestamped by a streamer.
  hf_generate_batch  transformers' own continuous batching, `model.generate_batch()` with all c requests at once.
  engine             our engine in this process (workers/engine): a closed loop that keeps c requests in flight
                     until N = max(--waves × c, --num-prompts) are done.
  engine_process     the same engine as the service's worker runs it: in a process of its own (workers/engine/
                     process.py) with the worker's torch threads (--service-torch-threads), the client threads
                     in this process. The service's ratio to it is the cost of HTTP, Redis and Celery alone.
  service            the whole service over HTTP (API under gunicorn -> Redis/Celery -> a worker holding the
                     model: tiny-random, or --model mistral7b/tiny7b on --device through
                     scripts/bench/service_worker.py), started with scripts/stack.py, with c concurrent streams, N
                     requests in all:
                     greedy from an aiohttp client (--service-client), and t1.0 from the official openai SDK at
                     concurrency 1 and the highest level (--service-sdk-sampling); on CPU also defaults,
                     json_schema, defaults-json-len and logprobs from --service-client at the highest level
                     (--service-sampling), for x defaults.

Each row runs one sampling workload. The engine modes run --sampling's at every level (default greedy, defaults,
t0.7-p0.9, penalties, json_schema, defaults-json-len and logprobs: x greedy compares each with greedy, x defaults
the last three with defaults); the hf_generate modes stay greedy, the baseline:
  greedy      temperature 0
  defaults    the docs' defaults: temperature 0.3, top_p 1 (what a request gets when it names none)
  t0.7-p0.9   temperature 0.7, top_p 0.9
  penalties   the docs' defaults with frequency_penalty 0.5 and presence_penalty 0.5
  t1.0        temperature 1.0, top_p 1
  json_schema the docs' defaults with response_format json_schema (workloads.JSON_SCHEMA: a name of <= 16
              characters, an age in 0..150, at most 4 tags of <= 8): the engine modes send its grammar
              (EngineRequest(grammar=...)), the service the response_format. A row ends when its JSON is complete
              (finish "stop"), well before --output-len: its tokens/s, TPOT and ITL are of the tokens it produced
              ("out len" is their mean per request)
  defaults-json-len  json_schema's unconstrained twin: the docs' defaults, request i with max_tokens = the tokens
              json_schema's request i produced (same level and round). json_schema over it is the grammar's own
              cost (vs_length_matched in the JSON); its own x defaults is what the shorter requests cost
  logprobs    the docs' defaults with logprobs and top_logprobs 5 (EngineRequest(logprobs=5))
Request i of a level has seed i: each request draws its own random stream, as distinct users' requests do.

    python -m scripts.bench                        # CPU: tiny model, 128 in / 128 out, concurrency 1,8,32
    python -m scripts.bench --quick                # a smoke run (small sizes)
    python -m scripts.bench --sampling greedy --service-sampling '' --service-sdk-sampling ''   # greedy only
    python -m scripts.bench --modes engine_process --sampling defaults,json_schema,defaults-json-len,logprobs
    python -m scripts.bench --device cuda          # GPU: random-weight Mistral-7B v0.2 shape in NF4, 1..256
    python -m scripts.bench --model tiny7b --modes hf_generate,engine --quick   # the GPU code path, tiny, on CPU

Output lengths are forced so every path does the same work: `min_new_tokens` for generate, EOS disabled for
generate_batch and the engine (eos_token_id=-1; a json_schema row alone ends sooner, when its grammar is
complete, and defaults-json-len with it). The service cannot be told to ignore EOS: a random-weight model
rarely emits it, but if it does the request ends early; its output tokens are counted from the usage the
stream reports (stream_options.include_usage), and the number of short requests is reported.

Metrics follow vLLM's definitions: TTFT = first output - request start; TPOT = (latency - TTFT) / (tokens - 1)
per request; ITL = time between consecutive outputs of a request (an SSE chunk or an engine output, which may
carry more than one token); throughputs = totals / (last request end - first request start). Every throughput
is also given as a ratio to hf_generate's tokens/s, the service's to the engine's (same workload, same
concurrency), each sampled row's to its greedy row (same mode, same concurrency: x greedy), json_schema's,
defaults-json-len's and logprobs' to their defaults row (same mode and client, same concurrency: x defaults; the
issue-15 targets are json_schema >= 0.8x and logprobs >= 0.85x at 32) and each row's to its own series at
concurrency 1 (x c=1, the gain from batching). A table is printed and JSON written (default
bench-results/bench-<device>-<time>.json).

CPU timings on a small shared machine move by 20% from one run to the next, so on CPU every mode runs
--rounds times (3), interleaved (round 1: every mode, round 2: every mode...). Ratios are taken within a
round, and the table shows each row's median round, with the median ratios and the spread of tokens/s.
"""
# The package's modules (each one's docstring says what it holds):
#   __main__          the command line: options, their defaults, and the run over modes and rounds
#   workloads         the sampling workloads, the prompts, and how many requests a level sends
#   models            the device, its description for the JSON, and the models under test
#   hf_runners        the baselines: transformers' generate() and generate_batch()
#   engine_runners    our engine, in this process and in a process of its own
#   service_runners   the whole service over HTTP (scripts/stack.py), from aiohttp and the openai SDK
#   service_worker    the service's worker serving the benchmark's model (mistral7b, tiny7b) on its device
#   report            one request's timeline, the metrics of a level, the ratios, the table and the JSON
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
