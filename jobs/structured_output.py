"""`response_format` -> the grammar the constrained decoder enforces (llguidance), compiled and checked where
the request arrives: an invalid or unsupported schema is a 400 before anything is queued. The job carries the
grammar; the engine builds each request's matcher from it (workers/engine/grammar.py), off the decode loop.

{"type": "text"} has no grammar; {"type": "json_object"} is any JSON object; {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}} is JSON valid against the schema (an absent schema: any JSON).
"""
from __future__ import annotations

import json
from typing import Any, Optional

import llguidance

# Compact separators: the model writes no whitespace the schema does not need (fewer tokens, and on an
# untrained model far fewer ways to wander).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
MAX_SCHEMA_BYTES = 64 * 1024


class GrammarError(ValueError):
    """The response_format cannot be enforced (the message says why)."""


def json_schema_grammar(schema: Any) -> str:
    """The llguidance grammar of JSON valid against `schema` (a JSON Schema object), checked."""
    if not isinstance(schema, dict):
        raise GrammarError("the schema must be a JSON object")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, overrides=_JSON_OPTIONS)
    except ValueError as exc:
        raise GrammarError(str(exc)) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(messages[0] if messages else "the schema is not supported")
    return grammar


def grammar_for(response_format: Optional[dict]) -> Optional[str]:
    """The grammar for a request's response_format (as the protocol validated it), None for plain text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    spec = response_format.get("json_schema") or {}
    return json_schema_grammar(spec.get("schema") if spec.get("schema") is not None else {})
