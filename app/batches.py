"""OpenAI's Batch API: files in, line jobs through the queue, output and error files out.

`BatchService` answers the HTTP calls. `BatchDispatcher` drives batches: a background thread in every API
process (the API is where requests are validated and tokenized), which takes a lease on a batch so that one
process drives it at a time, and on each tick:
  - feeds input lines as jobs on the batch queue, keeping at most `batch_window` of them in flight, so a
    batch of any size is processed with memory that does not grow with it (bad lines go to the error file);
  - collects finished line jobs into the output or error file and the request counts;
  - finalizes (completed, cancelled or expired) when nothing is left.

Over several Redis nodes (REDIS_SHARDS), a batch, its line jobs and its output and error lists are on the
batch's shard (jobs/batches.py), so each of those steps stays one transaction or script on one node; the
input file is read from its own shard.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional, Union

from pydantic import ValidationError

from app.errors import APIError, from_validation_error
from app.protocol import CreateBatchRequest, completion_from_record
from app.serving import build_generation_request, parse_request, resolve_model, system_fingerprint
from jobs.batches import FINAL, BatchStore, to_api
from jobs.chat_format import is_valid_unicode
from jobs.files import FileStore
from jobs.models import ModelDirectory
from jobs.records import JobRecord, JobStatus
from jobs.shards import ShardedJobStore
from jobs.store import REDIS_DOWN, JobNotFound, JobStore

log = logging.getLogger(__name__)


class BatchService:
    def __init__(self, batches: BatchStore, files: FileStore):
        self.batches = batches
        self.files = files

    def create(self, data, owner: str) -> dict:
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            request = CreateBatchRequest.model_validate(data)
        except ValidationError as exc:
            raise from_validation_error(exc)
        meta = self.files.get(request.input_file_id)
        if meta is None or meta.owner != owner:
            raise APIError(404, f"No file found with id '{request.input_file_id}'.", param="input_file_id",
                           code="file_not_found")
        if meta.purpose != "batch":
            raise APIError(400, "The input file must have been uploaded with purpose 'batch'.",
                           param="input_file_id", code="invalid_value")
        return to_api(self.batches.create(owner, request.input_file_id, request.endpoint,
                                          request.completion_window, request.metadata))

    def get(self, batch_id: str, owner: str) -> dict:
        return to_api(self._owned(batch_id, owner))

    def cancel(self, batch_id: str, owner: str) -> dict:
        self._owned(batch_id, owner)
        self.batches.move(batch_id, "cancelling", only_from=("validating", "in_progress"))
        return to_api(self.batches.get(batch_id))

    def list(self, owner: str, limit: int, after: Optional[str]) -> dict:
        ids, has_more = self.batches.list_ids(owner, limit, after)
        data = [to_api(b) for b in map(self.batches.get, ids) if b]
        return {"object": "list", "data": data, "first_id": ids[0] if ids else None,
                "last_id": ids[-1] if ids else None, "has_more": has_more}

    def _owned(self, batch_id: str, owner: str) -> dict:
        batch = self.batches.get(batch_id)
        if batch is None or batch["owner"] != owner:
            raise APIError(404, f"No batch found with id '{batch_id}'.", param="batch_id", code="batch_not_found")
        return batch


def output_line(record: JobRecord) -> tuple[bool, str]:
    """A finished line job -> (succeeded?, its line in the output or error file), in OpenAI's shape."""
    line = {"id": f"batch_req_{record.id.removeprefix('chatcmpl-')}", "custom_id": record.custom_id}
    if record.status == JobStatus.COMPLETED:
        body = completion_from_record(record, system_fingerprint(record.request.model))
        line.update(response={"status_code": 200, "request_id": record.id, "body": body}, error=None)
        return True, json.dumps(line)
    error = record.error.model_dump() if record.error else {"message": "The request failed.",
                                                             "type": "server_error", "param": None, "code": None}
    line.update(response={"status_code": 500, "request_id": record.id, "body": {"error": error}}, error=None)
    return False, json.dumps(line)


def error_line(custom_id, index: int, message: str, code: str, param: Optional[str] = None,
               status_code: int = 400) -> str:
    """An input line that could not become a request."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return json.dumps({"id": f"batch_req_line{index}_{uuid.uuid4().hex[:8]}", "custom_id": custom_id,
                       "response": {"status_code": status_code, "request_id": None, "body": {"error": error}},
                       "error": {"code": code, "message": message, "line": index + 1}})


class BatchDispatcher:
    def __init__(self, settings, batches: BatchStore, files: FileStore, jobs: Union[ShardedJobStore, JobStore],
                 models: ModelDirectory, enqueue_batch_job: Callable[[JobRecord], None]):
        self.settings = settings
        self.models = models
        self.batches = batches
        self.files = files
        self.jobs = jobs if isinstance(jobs, ShardedJobStore) else ShardedJobStore([jobs])
        # A line job's record goes in the feed's MULTI on the batch's node: the job store must look for it
        # there, so both stores place ids over the same nodes, in the same order (app/__init__.py builds
        # them from one ShardedJobStore).
        if len(self.jobs.shards) != len(batches.placement.nodes):
            raise ValueError("the batch store and the job store must be built on the same Redis nodes")
        self.enqueue = enqueue_batch_job
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="batch-dispatcher", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        redis_away = False
        while not self._stop.is_set():
            try:
                self.tick()
                redis_away = False
            except REDIS_DOWN as exc:  # one line per outage, not a traceback per tick
                if not redis_away:
                    log.warning("batch dispatcher: Redis away (%s); retrying every tick", exc)
                redis_away = True
            except Exception:  # a bad record, a bug: log, wait, go on
                log.exception("batch dispatcher tick failed")
            self._stop.wait(self.settings.batch_tick_s)

    def tick(self) -> None:
        for batch_id in self.batches.active():
            try:  # one batch's trouble must not hold up the others
                if self.batches.take_lease(batch_id, self.holder, ttl_ms=int(self.settings.batch_lease_s * 1000)):
                    self.drive(batch_id)
            except Exception:
                log.exception("batch %s: step failed", batch_id)

    # --- one batch, one step
    def drive(self, batch_id: str) -> None:
        batch = self.batches.get(batch_id)
        if batch is None or batch["status"] in FINAL:
            self.batches.deactivate(batch_id)
            return
        if batch["status"] == "validating":
            self._validate(batch)
            return
        self._collect(batch_id)
        batch = self.batches.get(batch_id)
        inflight = self.batches.inflight_count(batch_id)
        if batch["status"] == "in_progress" and time.time() > batch["expires_at"]:
            self.batches.move(batch_id, "cancelling", only_from=("in_progress",), final_status="expired")
            batch = self.batches.get(batch_id)
        if batch["status"] == "in_progress":
            if batch["cursor"] < self._input_lines(batch):
                self._feed(batch, inflight)
            elif inflight == 0:
                self._finalize(batch, "completed")
        elif batch["status"] == "cancelling":
            if inflight:
                self._cancel_inflight(batch_id)
            else:
                self._finalize(batch, batch.get("final_status") or "cancelled")
        elif batch["status"] == "finalizing":
            self._finalize(batch, batch.get("final_status") or "completed")

    def _input_lines(self, batch: dict) -> int:
        meta = self.files.get(batch["input_file_id"])
        return meta.lines if meta else 0

    def _validate(self, batch: dict) -> None:
        """Count the requests (non-blank lines) in slices; then start."""
        meta = self.files.get(batch["input_file_id"])
        if meta is None:
            errors = {"object": "list", "data": [{"code": "file_not_found", "message": "The input file is gone.",
                                                  "param": "input_file_id", "line": None}]}
            if self.batches.move(batch["id"], "failed", only_from=("validating",), errors=json.dumps(errors)):
                self.batches.deactivate(batch["id"])
            return
        total = sum(1 for line in self.files.iter_lines(meta.id) if line.strip())
        self.batches.update(batch["id"], total=total)
        self.batches.move(batch["id"], "in_progress", only_from=("validating",))  # unless cancelled meanwhile

    def _feed(self, batch: dict, inflight: int) -> None:
        room = self.settings.batch_window - inflight
        if room <= 0:
            return
        batch_id, cursor = batch["id"], batch["cursor"]
        lines = self.files.read_lines(batch["input_file_id"], cursor, room)
        new_jobs, bad_lines = [], []
        for offset, line in enumerate(lines):
            if not line.strip():
                continue
            outcome = self._line_to_job(batch, cursor + offset, line)
            (new_jobs if isinstance(outcome, JobRecord) else bad_lines).append(outcome)
        keys = self.jobs.keys
        # Records, in-flight set, errors and cursor in one step, on the batch's node: the line jobs' ids and
        # the error list's are colocated with the batch.
        with self.batches.node(batch_id).pipeline() as pipe:
            for record in new_jobs:
                self.jobs.add_record(pipe, record)
                pipe.sadd(keys.batch_inflight(batch_id), record.id)
            if bad_lines:
                pipe.rpush(keys.file_lines(batch["error_list"]), *bad_lines)
                pipe.hincrby(keys.batch(batch_id), "failed", len(bad_lines))
            pipe.hset(keys.batch(batch_id), "cursor", cursor + len(lines))
            pipe.execute()
        for record in new_jobs:
            self.enqueue(record)

    def _line_to_job(self, batch: dict, index: int, line: str):
        """A JobRecord for a valid line, or the error line for a bad one (never an exception: a line that
        cannot be processed is that line's failure, not the batch's)."""
        try:
            return self._parse_line(batch, index, line)
        except Exception as exc:
            log.warning("batch %s: line %d could not be processed: %s", batch["id"], index + 1, type(exc).__name__)
            return error_line(None, index, f"Line {index + 1} could not be processed ({type(exc).__name__}).",
                              "invalid_line")

    def _parse_line(self, batch: dict, index: int, line: str):
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):
            return error_line(None, index, f"Line {index + 1} is not valid JSON.", "invalid_json_line")
        if not isinstance(data, dict):
            return error_line(None, index, f"Line {index + 1} must be a JSON object.", "invalid_json_line")
        custom_id = data.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or not is_valid_unicode(custom_id):
            return error_line(None, index, "custom_id must be a non-empty string.", "invalid_custom_id",
                              "custom_id")
        if data.get("method") != "POST":
            return error_line(custom_id, index, "method must be 'POST'.", "invalid_method", "method")
        if data.get("url") != batch["endpoint"]:
            return error_line(custom_id, index, f"url must be the batch's endpoint, '{batch['endpoint']}'.",
                              "invalid_url", "url")
        body = data.get("body")
        if isinstance(body, dict) and (body.get("stream") or body.get("background")):
            return error_line(custom_id, index, "stream and background are not allowed in a batch.",
                              "invalid_value", "body.stream")
        try:
            request = parse_request(body)
            route = resolve_model(self.models, request.model)
            generation = build_generation_request(request, self.settings.max_model_len, route)
        except APIError as exc:
            param = f"body.{exc.body['param']}" if exc.body.get("param") else "body"
            return error_line(custom_id, index, exc.body["message"], exc.body["code"] or "invalid_request",
                              param, exc.status)
        if not self.batches.add_custom_id(batch["id"], custom_id):
            return error_line(custom_id, index, f"Duplicate custom_id '{custom_id}'.", "duplicate_custom_id",
                              "custom_id")
        # Its id on the batch's shard: the feed writes its record with the batch's keys.
        return JobRecord.new(generation, id=self.batches.line_job_id(batch["id"]), kind="batch", owner=batch["owner"],
                             batch_id=batch["id"], custom_id=custom_id, queue=route.batch_queue)

    def _collect(self, batch_id: str) -> None:
        """Move finished line jobs into the output or error file (each exactly once: SREM decides)."""
        keys = self.jobs.keys
        ids = self.batches.inflight(batch_id)
        if not ids:
            return
        with self.batches.node(batch_id).pipeline(transaction=False) as pipe:  # the line jobs' node
            for job_id in ids:
                pipe.hget(keys.job(job_id), "status")
            statuses = pipe.execute()
        batch = self.batches.get(batch_id)
        for job_id, status in zip(ids, statuses):
            if status in ("queued", "in_progress"):
                continue
            try:
                record = self.jobs.get(job_id)
            except JobNotFound:  # expired: counted as failed, no line
                self.batches.collect(batch_id, job_id)
                continue
            if record.status == JobStatus.CANCELLED:  # cancelled lines are neither output nor error
                self.batches.collect(batch_id, job_id, counter="")
                continue
            ok, line = output_line(record)
            self.batches.collect(batch_id, job_id, line, batch["output_list" if ok else "error_list"],
                                 "completed" if ok else "failed")

    def _cancel_inflight(self, batch_id: str) -> None:
        """Lines no attempt runs end here; running ones are asked to stop (the next ticks collect them)."""
        for job_id in self.batches.inflight(batch_id):
            self.jobs.cancel(job_id)

    def _finalize(self, batch: dict, final_status: str) -> None:
        """Publish the output and error files (if they have lines), then the final status."""
        if batch["status"] == "in_progress" and not self.batches.move(
                batch["id"], "finalizing", only_from=("in_progress",), final_status=final_status):
            return  # cancelled meanwhile: the next step cancels it
        published = {}
        for kind, list_name, field in (("output", "output_list", "output_file_id"),
                                       ("error", "error_list", "error_file_id")):
            file_id = batch[list_name]
            if self.files.has_lines(file_id):
                if self.files.get(file_id) is None:
                    self.files.create_from_list(file_id, f"{batch['id']}_{kind}.jsonl", f"batch_{kind}",
                                                batch["owner"])
                published[field] = file_id
        self.batches.update(batch["id"], **published)
        if self.batches.move(batch["id"], final_status, only_from=("finalizing", "cancelling")):
            self.batches.deactivate(batch["id"])
            log.info("batch %s: %s", batch["id"], final_status)
