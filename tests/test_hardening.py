"""Bad input and identity, as an attacker and a careless client send them, through real
sockets: never a 500, always a row, bounded storage, one id per end user."""

from __future__ import annotations

import http.client
import json
import unicodedata
from typing import Any

import httpx

from tests.conftest import Running, ledger, put_user_quota
from tokentill.ingest.bounds import METADATA_KEY, METADATA_PAIRS, METADATA_VALUE


def _post(
    running: Running,
    body: bytes,
    headers: dict[str, Any] | None = None,
    path: str = "/v1/responses",
) -> tuple[int, Any]:
    port = int(running.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Authorization", "Bearer sk-test")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            conn.putheader(name, value)  # bytes values go out as they are
        conn.endheaders(body)
        answer = conn.getresponse()
        raw = answer.read()
        try:
            return answer.status, json.loads(raw)
        except ValueError:
            return answer.status, raw
    finally:
        conn.close()


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def test_deeply_nested_bodies_never_become_a_500(tokentill: Running) -> None:
    # Metadata 300 deep (orjson writes 255 levels at most): the upstream's own 400.
    body = json.dumps(
        {"model": "gpt-4o-mini", "input": "x", "user": "deep-1", "metadata": {"k": _nested(300)}}
    )
    status, answer = _post(tokentill, body.encode())
    assert status == 400 and answer["error"]["param"].startswith("metadata"), answer
    (row,) = tokentill.rows("user_id = 'deep-1'")
    assert row["status"] == "error" and row["http_status"] == 400
    assert row["metadata"] is None and row["truncated_fields"] == "metadata"
    # A streamed chat 300 deep elsewhere: re-encoded to ask for usage, served, metered.
    chat = {
        "model": "gpt-4o-mini",
        "stream": True,
        "user": "deep-2",
        "messages": [{"role": "user", "content": "hi", "name": "n"}],
        "extra": _nested(300),
    }
    status, answer = _post(tokentill, json.dumps(chat).encode(), path="/v1/chat/completions")
    assert status == 200, answer
    (row,) = tokentill.rows("user_id = 'deep-2'")
    assert row["status"] == "completed" and row["input_tokens"]
    # Deeper than any parser here reads: forwarded untouched, the upstream's 400, a row.
    deepest = '{"model": "m", "x": ' + '{"a": ' * 3000 + '"x"' + "}" * 3001
    status, answer = _post(tokentill, deepest.encode())
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert tokentill.rows("status = 'error' AND http_status = 400 AND user_id IS NULL")


def test_metadata_is_stored_within_the_response_objects_bounds(tokentill: Running) -> None:
    big = "v" * 2_000_000
    metadata = {f"key-{i:02d}" + "k" * 70: big for i in range(20)}
    for i in range(3):
        body = json.dumps(
            {"model": "gpt-4o-mini", "input": "x", "user": f"amp-{i}", "metadata": metadata}
        )
        status, _ = _post(tokentill, body.encode())
        assert status == 400  # the upstream refuses it; nothing billed
    rows = tokentill.rows("user_id LIKE 'amp-%'")
    assert len(rows) == 3
    for row in rows:
        stored = json.loads(row["metadata"])
        assert len(stored) == METADATA_PAIRS
        assert all(len(k) == METADATA_KEY and len(v) == METADATA_VALUE for k, v in stored.items())
        assert row["truncated_fields"] == "metadata"
        assert len(row["metadata"]) < 16 * (METADATA_KEY + METADATA_VALUE + 8)
    metrics = httpx.get(tokentill.url + "/metrics").text
    assert 'tokentill_stored_fields_cut_total{field="metadata"} 3.0' in metrics
    # Long model names and the like are bounded too, and flagged.
    body = json.dumps({"model": "m" * 5000, "input": "x", "user": "long-model"})
    _post(tokentill, body.encode())
    (row,) = tokentill.rows("user_id = 'long-model'")
    assert len(row["requested_model"]) == 256 and "requested_model" in row["truncated_fields"]


def test_the_user_header_is_utf8_and_refuses_control_characters(tokentill: Running) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "input": "x"}).encode()
    status, _ = _post(tokentill, body, {"X-Tokentill-User": "andré".encode()})
    assert status == 200
    assert tokentill.rows("user_id = 'andré'")
    for bad in (b"andr\xe9", "an\u0085n".encode()):  # latin-1, a C1 control in UTF-8
        status, answer = _post(tokentill, body, {"X-Tokentill-User": bad})
        assert status == 400, bad
        assert answer["error"]["code"] == "invalid_tokentill_user"
    before = len(ledger(tokentill.settings.upstream))
    for bad in (b"ann\x01", b"ann\x7f"):
        # C0 and DEL in a header are refused by the HTTP server itself, before tokentill.
        assert _post(tokentill, body, {"X-Tokentill-User": bad})[0] == 400
    assert len(ledger(tokentill.settings.upstream)) == before
    refused = {"model": "gpt-4o-mini", "input": "x", "user": "eve\x00il"}
    status, answer = _post(tokentill, json.dumps(refused).encode())
    assert status == 400 and answer["error"]["code"] == "invalid_end_user"
    assert answer["error"]["param"] == "user"
    assert len(tokentill.rows("status = 'error' AND http_status = 400")) == 3


def test_one_end_user_however_spelled(tokentill: Running) -> None:
    decomposed = unicodedata.normalize("NFD", "zoé")
    spellings = ["qa-alice", " qa-alice", "qa-alice\u200b", "\tqa-alice ", "qa-alice\ufeff"]
    for user in spellings:
        body = json.dumps({"model": "gpt-4o-mini", "input": "x", "user": user}).encode()
        assert _post(tokentill, body)[0] == 200
    body = json.dumps({"model": "gpt-4o-mini", "input": "x", "user": decomposed}).encode()
    assert _post(tokentill, body)[0] == 200
    assert _post(tokentill, body, {"X-Tokentill-User": " zoé ".encode()})[0] == 200
    users = [r["user_id"] for r in tokentill.rows()]
    assert users == ["qa-alice"] * len(spellings) + ["zoé", "zoé"]


def test_case_folding_is_a_setting(make_tokentill: Any) -> None:
    running: Running = make_tokentill(user_id_case_fold=True, quotas_enabled=True)
    quota = put_user_quota(running, "QA-Alice", limit_requests=1, period="day")
    assert quota["subject"] == "user:qa-alice"
    body = json.dumps({"model": "gpt-4o-mini", "input": "x", "user": "qa-alice"}).encode()
    assert _post(running, body)[0] == 200
    for user in ("QA-ALICE", " qa-alice", "Qa-Alice\u200b"):
        body = json.dumps({"model": "gpt-4o-mini", "input": "x", "user": user}).encode()
        status, answer = _post(running, body)
        assert status == 429 and answer["error"]["code"] == "user_quota_exceeded", user


def test_header_and_body_users_that_differ_are_both_recorded(make_tokentill: Any) -> None:
    running: Running = make_tokentill()
    body = json.dumps({"model": "gpt-4o-mini", "input": "x", "user": "qa-alice"}).encode()
    status, answer = _post(running, body, {"X-Tokentill-User": b"someone-else"})
    assert status == 200
    (row,) = running.rows()
    assert (row["user_id"], row["user_source"], row["body_user_id"]) == (
        "someone-else",
        "header",
        "qa-alice",
    )
    billed = {e["id"]: e for e in ledger(running.settings.upstream)}[answer["id"]]
    assert billed["user"] == "qa-alice"  # the upstream saw the body's user, untouched

    strict: Running = make_tokentill(refuse_user_mismatch=True)
    status, answer = _post(strict, body, {"X-Tokentill-User": b"someone-else"})
    assert status == 400 and answer["error"]["code"] == "user_mismatch"
    same = json.dumps({"model": "gpt-4o-mini", "input": "x", "user": "same"}).encode()
    assert _post(strict, same, {"X-Tokentill-User": b" same"})[0] == 200
