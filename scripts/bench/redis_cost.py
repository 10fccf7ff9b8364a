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


# Redis gives the commands that a script runs the client '?:0' in its slow log.
_IN_SCRIPT = "?:0"


def script_names() -> dict[str, str]:
    """sha1 of each of the service's Lua scripts -> a name for it (EVALSHA names a script by its sha1)."""
    import hashlib

    from jobs import fair_queue, store, telemetry, transition
    scripts = {"transition": transition.SCRIPT, "append": transition.APPEND, "fair park": fair_queue._PARK,
               "fair take": fair_queue._TAKE, "fair confirm": fair_queue._CONFIRM,
               "metrics state": telemetry._ENTER_STATE, "renew": store._RENEW, "reap lost": store._REAP_LOST,
               "mark delivered": store._MARK_DELIVERED}
    return {hashlib.sha1(source.encode()).hexdigest(): name for name, source in scripts.items()}


class CommandLog:
    """Every command Redis runs between start() and read(): its SLOWLOG with no threshold (the settings restored
    after), grouped. A command a client sent is counted under its name, an EVALSHA under its script's name (the job
    transition's also by its action: start, write, end, requeue), and the commands that scripts ran go together
    under "(inside scripts)". Durations are Redis's own, in µs; a script's include the commands it ran. Logging
    every command costs Redis time of its own: a run with the log on is for where the time goes, not for totals."""

    def __init__(self, client, max_entries: int = 500_000):
        self.client = client
        self.max_entries = max_entries
        self.names = script_names()
        self._saved: dict = {}

    def start(self) -> None:
        self._saved = self.client.config_get("slowlog-*")
        self.client.config_set("slowlog-max-len", self.max_entries)
        self.client.config_set("slowlog-log-slower-than", 0)
        self.client.slowlog_reset()

    def read(self) -> dict[str, tuple[int, int]]:
        """{group: (calls, µs)} since start(); the log is then off again (the settings as before start)."""
        entries = self.client.slowlog_get(self.max_entries)
        for name, value in self._saved.items():
            self.client.config_set(name, value)
        groups: dict[str, list[int]] = {}
        for entry in entries:
            group = self._group(entry)
            if group is None:
                continue
            calls_usec = groups.setdefault(group, [0, 0])
            calls_usec[0] += 1
            calls_usec[1] += int(entry["duration"])
        return {group: (calls, usec) for group, (calls, usec) in groups.items()}

    def _group(self, entry) -> Optional[str]:
        # redis-py gives the command and its arguments joined by spaces (keys and script names hold none)
        args = _text(entry["command"]).split()
        if not args or args[0].lower() in ("slowlog", "config"):
            return None  # this log's own
        if _text(entry["client_address"]) == _IN_SCRIPT:
            return "(inside scripts)"
        command = args[0].lower()
        if command != "evalsha" or len(args) < 3:
            return command
        name = self.names.get(args[1], f"script {args[1][:8]}")
        if name == "transition" and args[2].isdigit() and len(args) > 3 + int(args[2]):
            name += f" {args[3 + int(args[2])]}"  # ARGV[1], the action
        return f"evalsha {name}"


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def describe_log(groups: dict[str, tuple[int, int]], jobs: int, top: int = 12) -> list[str]:
    """The benchmark's lines: per job, the groups Redis spent most time in."""
    if not jobs:
        return []
    total = sum(usec for name, (_, usec) in groups.items() if name != "(inside scripts)")
    lines = [f"redis profile: {total / jobs:.0f} us per job in the commands clients sent (SLOWLOG, no threshold; "
             "a script's time includes the commands it ran)"]
    for name, (calls, usec) in sorted(groups.items(), key=lambda item: -item[1][1])[:top]:
        lines.append(f"redis profile:   {name:28s} {calls / jobs:6.2f} per job  {usec / jobs:7.1f} us per job  "
                     f"{usec / calls:6.1f} us each")
    return lines
