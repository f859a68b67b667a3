"""The Batch API on the fake: files in and out, batches that finish on their own.

``POST /v1/files`` keeps what is uploaded; ``GET /v1/files/{id}/content`` gives it
back. ``POST /v1/batches`` takes an uploaded JSONL file of requests (``custom_id``,
``method``, ``url``, ``body``) for ``/v1/responses``, ``/v1/chat/completions`` or
``/v1/embeddings``; after ``x-fake-background-delay-ms`` the batch is ``completed``:
each line is answered as the endpoint would (the same builders), billed in the ledger
at the ``batch`` service tier, and written to an output file of
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``
lines; a line the endpoint refuses goes, with its error body and status, to an error
file (``error_file_id``), as OpenAI's do. ``GET
/v1/batches/{id}`` shows the batch (the SDK's `Batch`).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any

import orjson
from openai.types.batch import Batch

from tokentill.fakeai import endpoints, errors, ids
from tokentill.fakeai.chat_builder import draft_chat
from tokentill.fakeai.request import Endpoint, read_request
from tokentill.fakeai.response_builder import draft_response
from tokentill.fakeai.sdk import coerce, dump
from tokentill.fakeai.usage import plan_usage

if TYPE_CHECKING:
    from tokentill.fakeai.app import FakeUpstream

BATCH_ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings")


class Batches:
    def __init__(self, fake: FakeUpstream) -> None:
        self._fake = fake
        self.files: dict[str, bytes] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def create(self, body: dict[str, Any], key: str, delay_s: float) -> bytes:
        input_file = body.get("input_file_id")
        if not isinstance(input_file, str):
            raise errors.missing_parameter("input_file_id")
        if input_file not in self.files:
            raise errors.OpenAIError(
                404, f"No such File object: {input_file}", param="input_file_id"
            )
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            raise errors.OpenAIError(
                400, f"Invalid endpoint: {endpoint!r}.", param="endpoint", code="invalid_value"
            )
        now = int(time.time())
        batch: dict[str, Any] = {
            "id": "batch_" + ids.request_id()[4:],
            "object": "batch",
            "endpoint": endpoint,
            "input_file_id": input_file,
            "completion_window": str(body.get("completion_window", "24h")),
            "status": "validating",
            "created_at": now,
            "expires_at": now + 86_400,
            "metadata": body.get("metadata"),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        self._batches[batch["id"]] = batch
        task = asyncio.get_running_loop().create_task(self._finish(batch, key, delay_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return self.render(batch["id"])

    def render(self, batch_id: str) -> bytes:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise errors.OpenAIError(404, f"No batch found with id '{batch_id}'.")
        return dump(coerce(Batch, batch))

    async def _finish(self, batch: dict[str, Any], key: str, delay_s: float) -> None:
        batch["status"], batch["in_progress_at"] = "in_progress", int(time.time())
        await asyncio.sleep(delay_s)
        lines = [
            orjson.loads(raw)
            for raw in self.files[batch["input_file_id"]].splitlines()
            if raw.strip()
        ]
        out: list[bytes] = []
        failures: list[bytes] = []
        for line in lines:
            status, answer = self._answer(line, key)
            # As OpenAI's: answered requests in the output file, refused ones in the error file.
            (out if status == 200 else failures).append(
                orjson.dumps(
                    {
                        "id": "batch_req_" + ids.request_id()[4:],
                        "custom_id": line.get("custom_id"),
                        "response": {
                            "status_code": status,
                            "request_id": ids.request_id(),
                            "body": answer,
                        },
                        "error": None,
                    }
                )
            )
        files: dict[str, str] = {}
        for name, content in (("output_file_id", out), ("error_file_id", failures)):
            if content:
                files[name] = ids.file_id()
                self.files[files[name]] = b"\n".join(content) + b"\n"
        failed = len(failures)
        now = int(time.time())
        batch.update(
            status="completed",
            **files,
            finalizing_at=now,
            completed_at=now,
            request_counts={
                "total": len(lines),
                "completed": len(lines) - failed,
                "failed": failed,
            },
        )

    def _answer(self, line: dict[str, Any], key: str) -> tuple[int, Any]:
        fake = self._fake
        given = line.get("body")
        body: dict[str, Any] = given if isinstance(given, dict) else {}
        try:
            if line.get("url") == "/v1/embeddings":
                return 200, orjson.loads(endpoints.embeddings(fake, body, key, tier="batch"))
            kind: Endpoint = "chat" if line.get("url") == "/v1/chat/completions" else "responses"
            info = read_request({**body, "stream": False}, kind)
            rng = random.Random(orjson.dumps(body))
            plan = plan_usage(info, rng)
            if kind == "chat":
                chat = draft_chat(info, plan, rng, created=int(time.time()))
                fake.record_chat(chat, key, tier="batch")
                return 200, orjson.loads(dump(chat.completion()))
            response = draft_response(info, plan, rng, created_at=int(time.time()))
            fake.record_response(response, key, tier="batch")
            return 200, orjson.loads(dump(response.final()))
        except errors.OpenAIError as error:
            return error.status, orjson.loads(error.body())
