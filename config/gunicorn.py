"""gunicorn's configuration file for the API: every gunicorn that serves it loads it with
`-c config/gunicorn.py` (the Procfile's `web` line, scripts/stack.py). The command lines keep their
options; this file only adds what prometheus_client's multiprocess mode asks of a gunicorn deployment
(https://prometheus.github.io/client_python/multiprocess/):

* PROMETHEUS_MULTIPROC_DIR, set for the whole server before any worker imports prometheus_client. The
  master sets it in `on_starting`, before it forks a worker, and every worker inherits it. It names a
  directory of this master's own, `{METRICS_DIR}/gunicorn-{master pid}`, created empty at start (the
  docs ask for a wiped directory on each run: one left by a dead master of the same pid is emptied)
  and removed in `on_exit`. So a restart of the API begins at zero, a worker that gunicorn restarts
  keeps adding to its master's totals, and two servers at once (`make run` and the tests' API) never
  touch each other's files. A PROMETHEUS_MULTIPROC_DIR inherited from the environment is replaced:
  choose the place with METRICS_DIR.
* `child_exit`: `multiprocess.mark_process_dead(worker.pid)` when a worker exits, the documented hook.
  It removes the dead worker's files of live gauges (multiprocess_mode "live..."). The API has none
  today (app/metrics.py: counters and histograms only; its gauges are read from Redis at scrape time),
  so it removes nothing yet, but a live gauge added later is handled without more work here.

Module-level names here are read by gunicorn as settings, hence the underscores on the imports.
"""
import os as _os
import shutil as _shutil
import tempfile as _tempfile
from pathlib import Path as _Path


def on_starting(server):
    """In the master, before the first worker is forked: this server's fresh metrics directory."""
    from config.settings import Settings  # not get_settings(): the workers would inherit its cache

    name = f"gunicorn-{server.pid}"
    path = _Path(Settings().metrics_dir).resolve() / name
    try:
        _shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    except OSError as exc:  # e.g. a read-only checkout: a fresh temporary directory instead
        path = _Path(_tempfile.mkdtemp(prefix=f"llmq-prometheus-{name}-"))
        server.log.warning("metrics: cannot use METRICS_DIR (%s); using %s", exc, path)
    _os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def child_exit(server, worker):
    """In the master, after a worker exited (or was killed). prometheus_client is imported here, not at the
    top: the master must not import it before `on_starting` set the directory."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """The master is stopping (its workers are gone): its directory goes too."""
    path = _os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        _shutil.rmtree(path, ignore_errors=True)
