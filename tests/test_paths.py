"""No way around the meter by spelling: every spelling of a metered path is metered (and
quota-checked) as the path it names, and forwarded in its canonical form; what cannot be
made canonical safely is refused with OpenAI's 404 and never forwarded."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from tests.conftest import Running, ledger, put_user_quota
from tokentill.ingest.paths import NonCanonicalPath, canonical_path

BODY = {"model": "gpt-4o-mini", "input": "hi"}


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/v1/responses", "/v1/responses"),
        ("/v1/responses/", "/v1/responses"),
        ("/v1//responses", "/v1/responses"),
        ("//v1///responses//", "/v1/responses"),
        ("/v1/./responses", "/v1/responses"),
        ("/v1/x/../responses", "/v1/responses"),
        ("/%76%31/respons%65s", "/v1/responses"),
        ("/v1/responses/resp%5fabc", "/v1/responses/resp_abc"),
        ("/v1/files/a%20b", "/v1/files/a%20b"),
        ("/v1/files/a%3ab", "/v1/files/a%3Ab"),
    ],
)
def test_canonical_spellings(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/../api/costs",
        "/v1/responses/../../api",
        "/v1/responses%2F",
        "/v1/responses%2f..%2f..%2fapi",
        "/v1/responses%5C",
        "/v1/responses\\",
        "/v1/responses%00",
        "/v1/responses%zz",
        "/v1/responses%",
        "/v1/resp\x01onses",
        "/..",
    ],
)
def test_paths_that_cannot_be_made_canonical_are_refused(raw: str) -> None:
    with pytest.raises(NonCanonicalPath):
        canonical_path(raw)


def _post(running: Running, path: str, body: dict[str, Any], **headers: str) -> tuple[int, Any]:
    port = int(running.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        raw = json.dumps(body).encode()
        conn.request(
            "POST",
            path,  # sent verbatim: http.client does not normalise the target
            raw,
            {"Authorization": "Bearer sk-test", "Content-Type": "application/json", **headers},
        )
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"null")
    finally:
        conn.close()


SPELLINGS = [
    "/v1/responses/",
    "/v1//responses",
    "/v1/./responses",
    "/v1/x/../responses",
    "/%76%31/respons%65s",
    "/v1/responses//",
]


def test_every_spelling_of_a_metered_path_is_metered(tokentill: Running) -> None:
    for index, path in enumerate(SPELLINGS):
        status, body = _post(tokentill, path, {**BODY, "user": f"spell-{index}"})
        assert status == 200, (path, body)
        (row,) = tokentill.rows("user_id = ?", [f"spell-{index}"])
        assert row["response_id"] == body["id"] and row["endpoint"] == "responses"
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    status, body = _post(tokentill, "/v1//chat/./completions/", {**chat, "user": "spell-chat"})
    assert status == 200, body
    assert tokentill.rows("user_id = 'spell-chat'")[0]["response_id"] == body["id"]


def test_a_quota_cannot_be_dodged_by_spelling(make_tokentill: Any) -> None:
    running: Running = make_tokentill(quotas_enabled=True)
    put_user_quota(running, "speller", limit_requests=1, period="day")
    assert _post(running, "/v1/responses", {**BODY, "user": "speller"})[0] == 200
    for path in SPELLINGS:
        status, body = _post(running, path, {**BODY, "user": "speller"})
        assert status == 429, (path, body)
        assert body["error"]["code"] == "user_quota_exceeded"


def test_paths_out_of_v1_are_refused_and_never_forwarded(tokentill: Running) -> None:
    before = len(ledger(tokentill.settings.upstream))
    for path in ("/v1/../api/costs", "/v1/responses%2F", "/v1/responses%2f..%2fx", "/v1/a%00"):
        status, body = _post(tokentill, path, BODY)
        assert status == 404, (path, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "unknown_url"
    assert len(ledger(tokentill.settings.upstream)) == before
    assert tokentill.rows() == []
