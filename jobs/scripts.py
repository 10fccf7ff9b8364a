"""Lua scripts that join pipelines without an extra round trip.

redis-py's `Script`, called on a pipeline, makes that pipeline's execute() first ask Redis `SCRIPT EXISTS`
for its scripts: one more round trip on every pipeline that carries a script, however often it runs. The
job store's pipelines are on the hottest paths (every request's record, every publisher cycle, every lease
renewal), and in a busy process each round trip costs a wait for the event loop, not just the network.

Redis keeps a loaded script until it restarts (or SCRIPT FLUSH), so a `ScriptSet` loads its scripts once
and then sends bare EVALSHA. A pipeline that meets NOSCRIPT (Redis restarted since) is filled and run once
more after loading them again: `run` is for pipelines whose writes are idempotent, as all of ours are.
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence

from redis.client import Pipeline
from redis.exceptions import NoScriptError


class ScriptSet:
    def __init__(self, client):
        self.client = client
        self._scripts: list[Script] = []
        self._loaded = False
        self._lock = threading.Lock()

    def register(self, source: str) -> "Script":
        script = Script(self, source)
        with self._lock:
            self._scripts.append(script)
            self._loaded = False
        return script

    def ensure_loaded(self) -> None:
        """Load every script once (one round trip); again after `run` met NOSCRIPT."""
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                with self.client.pipeline(transaction=False) as pipe:
                    for script in self._scripts:
                        pipe.script_load(script.source)
                    pipe.execute()
                self._loaded = True

    def run(self, fill: Callable[[Pipeline], None], transaction: bool = True, raise_on_error: bool = True) -> list:
        """A pipeline filled by `fill` (which may call this set's scripts on it), executed; filled and run
        once more if Redis had lost the scripts. With raise_on_error=False, other errors come back as results."""
        try:
            return self._run(fill, transaction, raise_on_error)
        except NoScriptError:  # Redis lost them (a restart): load them again, run it again
            return self._run(fill, transaction, raise_on_error)

    def _run(self, fill: Callable[[Pipeline], None], transaction: bool, raise_on_error: bool) -> list:
        self.ensure_loaded()
        with self.client.pipeline(transaction=transaction) as pipe:
            fill(pipe)
            try:
                results = pipe.execute(raise_on_error=raise_on_error)
            except NoScriptError:
                self._loaded = False
                raise
        for result in results:
            if isinstance(result, NoScriptError):
                self._loaded = False
                raise result
        return results


class Script:
    """One Lua script: called like redis-py's Script (keys, args, client), and as bare EVALSHA in a
    pipeline (run the pipeline with `ScriptSet.run`)."""

    def __init__(self, scripts: ScriptSet, source: str):
        self.scripts = scripts
        self.source = source
        self._direct = scripts.client.register_script(source)  # its sha; loads itself on NOSCRIPT when called
        self.sha = self._direct.sha

    def __call__(self, keys: Sequence = (), args: Sequence = (), client=None):
        if isinstance(client, Pipeline):
            return client.evalsha(self.sha, len(keys), *keys, *args)
        return self._direct(keys=keys, args=args, client=client)
