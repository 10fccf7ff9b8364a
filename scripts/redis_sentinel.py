"""A Redis Sentinel set on this machine, for tests that fail Redis over: a primary and one replica (the
project's config/redis.conf: AOF, noeviction) and three Sentinels, each a subprocess on a free port, with
its files in its own folder of `data_dir`. Modelled on scripts/stack.py's RedisServer.

Sentinels here judge a master down after `down_after_ms` without an answer (1 s, where production would use
several seconds), so a test's failover takes a few seconds, not half a minute."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from scripts.stack import ROOT, free_port, wait_until

MASTER_NAME = "llmq"


class RedisNode:
    """One redis-server of the set (its port stays the same across restarts: Sentinel knows it by address)."""

    def __init__(self, data_dir: Path, replica_of: int | None = None):
        self.port = free_port()
        self.data_dir = data_dir
        self.replica_of = replica_of
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Its own copy of the project's config: a Sentinel that reconfigures a node (replicaof) makes it rewrite
        # its config file (CONFIG REWRITE), which must never be config/redis.conf itself.
        conf = self.data_dir / "redis.conf"
        if not conf.exists():
            shutil.copyfile(ROOT / "config" / "redis.conf", conf)
        cmd = ["redis-server", str(conf), "--port", str(self.port),
               "--dir", str(self.data_dir), "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log")]
        if self.replica_of is not None:
            cmd += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _pings(self.client()), 10, f"redis-server on port {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)

    def stop(self, graceful: bool = True) -> None:
        """Graceful: SIGTERM (Redis fsyncs its AOF and exits). Else SIGKILL: a crash."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen one could not exit
            self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: it stops reading (a stalled replica: what its master sends meanwhile waits in a buffer)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def replication(self) -> dict:
        return self.client().info("replication")


class SentinelProcess:
    def __init__(self, data_dir: Path, master_port: int, quorum: int, down_after_ms: int):
        self.port = free_port()
        self.data_dir = data_dir
        self.master_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "sentinel.conf"  # a Sentinel rewrites its own config file: one file each
        conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.data_dir}",
            f"logfile {self.data_dir / 'sentinel.log'}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} {self.quorum}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} 10000",
            f"sentinel parallel-syncs {MASTER_NAME} 1", ""]))
        self.proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(lambda: _pings(self.client()), 10, f"Sentinel on port {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None


class SentinelSet:
    """A primary, a replica and `sentinels` Sentinels (quorum: a majority). `url(db)` is the REDIS_URL that
    names the set (jobs/redis_connection.py)."""

    def __init__(self, data_dir: Path, sentinels: int = 3, down_after_ms: int = 1000):
        self.data_dir = data_dir
        primary = RedisNode(data_dir / "node0")
        self.nodes = [primary, RedisNode(data_dir / "node1", replica_of=primary.port)]
        self.sentinels = [SentinelProcess(data_dir / f"sentinel{i}", primary.port, sentinels // 2 + 1,
                                          down_after_ms) for i in range(sentinels)]

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/{db}"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.wait_replicated(timeout=20)
        for sentinel in self.sentinels:
            sentinel.start()
        # Every Sentinel knows the replica and the other Sentinels (they find each other through the master's
        # hello channel): until then a failover could not be agreed on.
        def acquainted():
            try:
                states = [s.client().sentinel_master(MASTER_NAME) for s in self.sentinels]
                return all(int(state["num-other-sentinels"]) == len(self.sentinels) - 1
                           and int(state["num-slaves"]) >= 1 for state in states)
            except redis.RedisError:
                return False
        wait_until(acquainted, 30, "the Sentinels to know the replica and each other", interval=0.2)

    def master_port(self) -> int:
        """The master's port, as the Sentinels (the first that answers) see it now."""
        for sentinel in self.sentinels:
            try:
                return int(sentinel.client().sentinel_get_master_addr_by_name(MASTER_NAME)[1])
            except (redis.RedisError, TypeError):
                continue
        raise RuntimeError("no Sentinel answers")

    def master(self) -> RedisNode:
        port = self.master_port()
        return next(node for node in self.nodes if node.port == port)

    def replica(self) -> RedisNode:
        port = self.master_port()
        return next(node for node in self.nodes if node.port != port)

    def kill_master(self, lag_s: float = 0.0) -> tuple[RedisNode, int]:
        """SIGKILL the master, as a crash of its machine would: what it had not sent its replica is gone. With
        `lag_s`, the replication link is cut that long before (the master drops its replica, which is frozen
        meanwhile so that it cannot reconnect: a partition between the two), so that what the master takes
        meanwhile is surely lost; the replica is thawed right after the kill. Returns the dead node and its
        replication offset just before the kill."""
        node, replica = self.master(), self.replica()
        if lag_s:
            replica.freeze()
            node.client().client_kill_filter(_type="replica")
            time.sleep(lag_s)
        try:
            offset = int(node.replication()["master_repl_offset"])
        except redis.RedisError:
            offset = -1
        node.stop(graceful=False)
        replica.thaw()
        return node, offset

    def promoted_at_offset(self) -> int:
        """The replication offset the current master had when it was promoted (what it had of the old
        master's stream): compare with the old master's offset at its death."""
        return int(self.master().replication()["second_repl_offset"]) - 1

    def failover(self) -> None:
        """SENTINEL FAILOVER: promote the replica while the master is alive (a planned switch)."""
        self.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

    def wait_new_master(self, old_port: int, timeout: float = 30) -> int:
        """Until every Sentinel names a master other than `old_port` and that master answers as one."""
        def switched():
            try:
                ports = {int(s.client().sentinel_get_master_addr_by_name(MASTER_NAME)[1]) for s in self.sentinels
                         if s.proc is not None}
                if len(ports) != 1 or old_port in ports:
                    return None
                port = ports.pop()
                node = next(n for n in self.nodes if n.port == port)
                return port if node.client().info("replication")["role"] == "master" else None
            except (redis.RedisError, TypeError):
                return None
        return wait_until(switched, timeout, "the Sentinels to fail over", interval=0.1)

    def wait_replicated(self, timeout: float = 30) -> None:
        """Until the master has a replica online and caught up with its replication offset."""
        def caught_up():
            try:
                master = next(n for n in self.nodes if n.proc and n.client().info("replication")["role"] == "master")
                info = master.client().info("replication")
                replica = info.get("slave0")
                return replica and replica["state"] == "online" and replica["offset"] >= info["master_repl_offset"]
            except (redis.RedisError, StopIteration, KeyError):
                return False
        wait_until(caught_up, timeout, "the replica to catch up", interval=0.1)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()


def _pings(client) -> bool:
    try:
        return client.ping()
    except redis.RedisError:
        return False
