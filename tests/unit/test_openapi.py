"""`/openapi.json` is generated from the pydantic models (app/protocol.py, app/schemas.py), and the real
responses of the API (the Flask app with a scripted worker, as in test_api_relay.py) validate against those
models and against their schemas in the document, which is what the fuzzer (tests/fuzz) checks them with."""
from __future__ import annotations

import io
import json
import time
from types import SimpleNamespace

import jsonschema
import pytest
from pydantic import ValidationError

from app import schemas as s
from app.batches import BatchService
from app.errors import APIError
from app.openapi import REQUESTS, RESPONSES, build_document
from app.protocol import CreateBatchRequest
from jobs.records import JobResult, Usage
from tests.unit.test_api_relay import BODY, fails_after_one_delta

DOCUMENT = build_document()
SCHEMAS = DOCUMENT["components"]["schemas"]


def check(model, data) -> None:
    """`data` (a decoded JSON response) is a `model`, and valid against that model's schema in the document."""
    model.model_validate_json(json.dumps(data), strict=True)
    jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{model.__name__}", **DOCUMENT}).validate(data)


def refs(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for value in node.values() for r in refs(value)]
    return [r for value in node for r in refs(value)] if isinstance(node, list) else []


# --------------------------------------------------------------------------------------- the document
def test_every_schema_in_the_document_is_a_model_or_one_that_a_model_uses():
    for mode, models in (("validation", REQUESTS), ("serialization", RESPONSES)):
        for model in models:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
            for name, definition in {**schema.pop("$defs", {}), model.__name__: schema}.items():
                assert SCHEMAS[name] == definition, name
    body_refs = [content["schema"]["$ref"] for item in DOCUMENT["paths"].values() for op in item.values()
                 for content in op.get("requestBody", {}).get("content", {}).values()]
    assert sorted(body_refs) == sorted(f"#/components/schemas/{m.__name__}" for m in REQUESTS)
    response_refs = {content["schema"]["$ref"] for item in DOCUMENT["paths"].values() for op in item.values()
                     for response in op["responses"].values()
                     for content in response.get("content", {}).values() if "$ref" in content["schema"]}
    assert response_refs <= {f"#/components/schemas/{m.__name__}" for m in RESPONSES}
    for ref in refs(DOCUMENT):
        assert ref.removeprefix("#/components/schemas/") in SCHEMAS, ref
    jsonschema.Draft202012Validator.check_schema({"$defs": SCHEMAS})


def test_the_chat_request_schema_shows_the_rules_that_validation_enforces():
    props = SCHEMAS["ChatCompletionRequest"]["properties"]

    def number(name):  # every field but messages takes null for "the default"
        number_schema, null = props[name]["anyOf"]
        assert null == {"type": "null"}
        return number_schema

    assert SCHEMAS["ChatCompletionRequest"]["required"] == ["messages"]
    assert SCHEMAS["ChatCompletionRequest"]["additionalProperties"] is False
    assert {k: number("temperature")[k] for k in ("minimum", "maximum")} == {"minimum": 0, "maximum": 1}
    assert {k: number("top_p")[k] for k in ("minimum", "maximum")} == {"minimum": 0, "maximum": 1}
    for name in ("frequency_penalty", "presence_penalty"):
        assert {k: number(name)[k] for k in ("minimum", "maximum")} == {"minimum": -2, "maximum": 2}
    assert number("max_tokens")["minimum"] == number("max_completion_tokens")["minimum"] == 1
    assert (number("n")["minimum"], number("n")["maximum"]) == (1, 8)
    assert (number("top_logprobs")["minimum"], number("top_logprobs")["maximum"]) == (0, 20)
    assert props["logit_bias"]["anyOf"][0]["maxProperties"] == 300
    assert props["messages"]["minItems"] == 1 and "anyOf" not in props["messages"]
    string, array, _ = props["stop"]["anyOf"]
    assert (string["minLength"], string["maxLength"], array["maxItems"]) == (1, 256, 4)
    message = SCHEMAS["ChatMessage"]
    assert message["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    assert [part.get("minLength", part.get("minItems")) for part in message["properties"]["content"]["anyOf"]] == [1, 1]


def test_the_batch_route_accepts_and_refuses_what_its_model_does():
    """The route validates with CreateBatchRequest, then checks the input file: nothing else may refuse."""
    class Accepted(Exception):
        pass

    def create(*args):
        raise Accepted

    files = SimpleNamespace(get=lambda file_id: SimpleNamespace(owner="me", purpose="batch"))
    service = BatchService(SimpleNamespace(create=create), files)
    ok = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    values = [None, "", "x", "24h", "/v1/chat/completions", 5, 1.5, True, [], ["24h"], {}, {"a": "b"}]
    bodies = [None, [], "x", {}, ok, {**ok, "extra": 1}, {**ok, "metadata": {str(i): "v" for i in range(16)}},
              {**ok, "metadata": {str(i): "v" for i in range(17)}}, {**ok, "metadata": {"a": 1}},
              *({k: v for k, v in ok.items() if k != field} for field in ok),
              *({**ok, field: value} for field in (*ok, "metadata") for value in values)]
    for body in bodies:
        try:
            CreateBatchRequest.model_validate(body, strict=True)
            model_accepts = True
        except ValidationError:
            model_accepts = False
        try:
            service.create(body, "me")
            raise AssertionError("unreachable: the stub store raises")
        except Accepted:
            service_accepts = True
        except APIError:
            service_accepts = False
        assert model_accepts == service_accepts, body


# ------------------------------------------------------------------------------ the real responses
def answers(events):
    events.delta("Hel")
    events.delta("lo")
    events.completed(JobResult(text="Hello", finish_reason="stop",
                               usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)))


def sse_data(response) -> list:
    lines = response.get_data(as_text=True).split("\n")
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def wait_job(client, job_id: str) -> dict:
    deadline = time.monotonic() + 10
    while (job := client.get(f"/v1/chat/completions/{job_id}").json)["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_chat_completion_responses_are_their_models(make_client):
    client = make_client(answers)
    response = client.post("/v1/chat/completions", json=BODY)
    assert response.status_code == 200
    check(s.ChatCompletion, response.json)
    for include_usage in (False, True):
        response = client.post("/v1/chat/completions", json={
            **BODY, "stream": True, "stream_options": {"include_usage": include_usage}})
        chunks = sse_data(response)
        assert len(chunks) == 4 + include_usage
        for chunk in chunks:
            check(s.ChatCompletionChunk, chunk)

    job = client.post("/v1/chat/completions", json={**BODY, "background": True})
    assert job.status_code == 202
    check(s.ChatCompletionJob, job.json)
    done = wait_job(client, job.json["id"])
    assert done["result"] is not None
    check(s.ChatCompletionJob, done)
    check(s.ChatCompletionJob, client.post(f"/v1/chat/completions/{job.json['id']}/cancel").json)
    for chunk in sse_data(client.get(f"/v1/chat/completions/{job.json['id']}/events")):
        check(s.ChatCompletionChunk, chunk)
    store = client.application.extensions["chat_service"].store
    for status in ("completed", "expired"):
        page = client.get("/v1/chat/completions?limit=5").json
        assert [j["status"] for j in page["data"]] == [status]
        check(s.ChatCompletionJobList, page)
        check(s.ChatCompletionJob, client.get(f"/v1/chat/completions/{job.json['id']}").json)
        store.redis.delete(store.keys.job(job.json["id"]))  # its record expires: listed and polled as expired


def test_failed_jobs_and_errors_are_their_models(make_client):
    client = make_client(fails_after_one_delta)
    error_event = sse_data(client.post("/v1/chat/completions", json={**BODY, "stream": True}))[-1]
    check(s.Error, error_event)
    response = client.post("/v1/chat/completions", json=BODY)
    assert response.status_code == 500
    check(s.Error, response.json)
    job = client.post("/v1/chat/completions", json={**BODY, "background": True}).json
    failed = wait_job(client, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "generation_failed"
    check(s.ChatCompletionJob, failed)
    too_long = {**BODY, "max_tokens": 10**9}
    for method, path, body, status in [
            ("post", "/v1/chat/completions", {"messages": []}, 400), ("post", "/v1/chat/completions", too_long, 400),
            ("post", "/v1/chat/completions", {**BODY, "model": "nope"}, 404), ("get", "/v1/files/file-x", None, 404),
            ("put", "/v1/chat/completions", None, 405), ("post", "/v1/batches", [], 400),
            ("get", "/nowhere", None, 404)]:
        response = getattr(client, method)(path, json=body)
        assert response.status_code == status, (path, response.json)
        check(s.Error, response.json)


def test_files_batches_models_and_probes_are_their_models(make_client):
    client = make_client(answers)
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": BODY})
    upload = {"purpose": "batch", "file": (io.BytesIO((line + "\n").encode()), "in.jsonl")}
    uploaded = client.post("/v1/files", data=upload, content_type="multipart/form-data").json
    check(s.File, uploaded)
    check(s.File, client.get(f"/v1/files/{uploaded['id']}").json)
    check(s.FileList, client.get("/v1/files").json)
    batch = client.post("/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h", "metadata": {"k": "v"}})
    assert batch.status_code == 200, batch.json
    check(s.Batch, batch.json)
    check(s.Batch, client.get(f"/v1/batches/{batch.json['id']}").json)
    check(s.Batch, client.post(f"/v1/batches/{batch.json['id']}/cancel").json)
    check(s.BatchList, client.get("/v1/batches").json)
    check(s.FileDeleted, client.delete(f"/v1/files/{uploaded['id']}").json)

    models = client.get("/v1/models").json
    check(s.ModelList, models)
    check(s.Model, client.get(f"/v1/models/{models['data'][0]['id']}").json)
    check(s.Health, client.get("/health").json)
    check(s.Ready, client.get("/ready").json)


@pytest.mark.parametrize("model", RESPONSES, ids=lambda m: m.__name__)
def test_response_models_forbid_fields_they_do_not_declare(model):
    """So that a field added to a response, and not to its model, fails the tests above (and the fuzzer)."""
    assert SCHEMAS[model.__name__]["additionalProperties"] is False
