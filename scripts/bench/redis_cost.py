"""What the service costs Redis: its own CPU (INFO cpu: used_cpu_user + used_cpu_sys) and its commands (INFO
commandstats: calls and microseconds per command) between two readings, turned into per generated token and per
stream event (issue 17: the measure of the event path, and of how many workers one Redis carries).

Readings are of the whole server: on a Redis that other clients use at the same time, they count too."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Usage:
    cpu_s: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)     # command -> calls
    usec: dict[str, int] = field(default_factory=dict)      # command -> microseconds spent in it
    # Reads from clients (INFO stats total_reads_processed): about one per round trip, a pipeline's included.
    # Steadier than CPU on a shared machine, and most of the CPU: each costs the server a read, a reply's write
    # and an event-loop pass, whatever the commands in it.
    requests: int = 0

    def __sub__(self, earlier: "Usage") -> "Usage":
        names = set(self.calls) | set(earlier.calls)
        return Usage(self.cpu_s - earlier.cpu_s,
                     {n: self.calls.get(n, 0) - earlier.calls.get(n, 0) for n in names},
                     {n: self.usec.get(n, 0) - earlier.usec.get(n, 0) for n in names},
                     self.requests - earlier.requests)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


class RedisCost:
    def __init__(self, client):
        self.client = client

    def read(self) -> Usage:
        cpu = self.client.info("cpu")
        stats = self.client.info("commandstats")  # {"cmdstat_get": {"calls": n, "usec": t, ...}, ...}
        calls, usec = {}, {}
        for name, entry in stats.items():
            command = name.removeprefix("cmdstat_").lower()
            calls[command] = int(entry.get("calls", 0))
            usec[command] = int(entry.get("usec", 0))
        requests = int(self.client.info("stats").get("total_reads_processed", 0))
        return Usage(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls, usec, requests)


def per_work(used: Usage, tokens: int, events: int, top: int = 5) -> dict:
    """Redis's CPU (µs) and commands per generated token, its CPU per stream event, and the `top` commands by
    time spent (calls, µs per call)."""
    def per(value: float, count: int) -> Optional[float]:
        return value / count if count else None

    busiest = sorted((n for n in used.calls if used.calls[n] > 0), key=lambda n: -used.usec.get(n, 0))[:top]
    return dict(redis_cpu_us_per_token=per(used.cpu_s * 1e6, tokens),
                redis_commands_per_token=per(used.total_calls, tokens),
                redis_requests_per_token=per(used.requests, tokens),
                redis_cpu_us_per_event=per(used.cpu_s * 1e6, events),
                redis_top_commands=[dict(command=n, calls=used.calls[n],
                                         usec_per_call=used.usec.get(n, 0) / used.calls[n]) for n in busiest])
