"""The worker's delivery records (workers/deliveries.py): a job that starts soon after its message came needs no
record; one still waiting after the grace gets it, once; a record that fails (Redis away) is logged, not raised."""
from __future__ import annotations

import time

from workers.deliveries import DeliveryRecorder


def wait_for(predicate, timeout: float = 2.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_job_that_starts_within_the_grace_is_never_recorded():
    marked = []
    recorder = DeliveryRecorder(marked.append, grace_s=0.2)
    recorder.received("job-1")
    recorder.started("job-1")
    time.sleep(0.4)
    recorder.stop()
    assert marked == []


def test_a_job_still_waiting_after_the_grace_is_recorded_once():
    marked = []
    recorder = DeliveryRecorder(marked.append, grace_s=0.05)
    recorder.received("slow")
    recorder.received("quick")
    recorder.started("quick")
    assert wait_for(lambda: marked == ["slow"])
    recorder.started("slow")  # it starts later: nothing more to record
    time.sleep(0.1)
    recorder.stop()
    assert marked == ["slow"]


def test_a_record_that_fails_is_logged_and_the_next_is_still_made(caplog):
    marked = []

    def flaky(job_id: str) -> None:
        if job_id == "first":
            raise ConnectionError("Redis away")
        marked.append(job_id)

    recorder = DeliveryRecorder(flaky, grace_s=0.02)
    recorder.received("first")
    recorder.received("second")
    assert wait_for(lambda: marked == ["second"])
    recorder.stop()
    assert "job first: delivery not recorded" in caplog.text
