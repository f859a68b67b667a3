"""The fake upstream's HTTP surface: OpenAI's routes plus ``/_fake/ledger``.

Routes: ``POST /v1/responses``, ``GET /v1/responses/{id}`` (``?stream=true`` replays a
background response's events after ``starting_after``), ``POST
/v1/responses/{id}/cancel``, the ``/v1/responses`` WebSocket (``tokentill.fakeai.socket``),
the ``/v1/realtime`` WebSocket (``tokentill.fakeai.realtime``),
``POST /v1/chat/completions``, ``/v1/embeddings``, ``/v1/completions`` and
``/v1/moderations`` (``tokentill.fakeai.endpoints``), ``GET /v1/models``,
``GET /v1/organization/costs`` and ``/v1/organization/usage/completions`` (what the
ledger billed; see `tokentill.fakeai.organization`), ``GET``/``DELETE /_fake/ledger``;
anything else is OpenAI's 404. See `tokentill.fakeai.scenarios` for the ``x-fake-*``
control headers.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import orjson
from openai.types.file_object import FileObject
from openai.types.model import Model
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from tokentill.fakeai import endpoints, errors, ids, media, organization
from tokentill.fakeai.batches import Batches
from tokentill.fakeai.catalog import listed_models
from tokentill.fakeai.chat_builder import ChatDraft, ChatOutcome, draft_chat
from tokentill.fakeai.ledger import Ledger, LedgerEntry, usage_columns
from tokentill.fakeai.realtime import REALTIME_PATH, serve_realtime
from tokentill.fakeai.request import Endpoint, RequestInfo, parse_body, read_request
from tokentill.fakeai.response_builder import (
    IncompleteReason,
    Outcome,
    ResponseDraft,
    draft_response,
)
from tokentill.fakeai.scenarios import Controls, Scenario, read_controls
from tokentill.fakeai.sdk import dump
from tokentill.fakeai.socket import serve_socket
from tokentill.fakeai.sse import (
    DONE_FRAME,
    EventStream,
    TruncatedBody,
    data_frame,
    event_frame,
)
from tokentill.fakeai.store import BackgroundJob, ResponseStore
from tokentill.fakeai.usage import UsagePlan, UsageSynth, plan_usage
from tokentill.fakeai.wire import OPENAI, WIRE_HEADER, Wire, WireWriter, parse_wire

RESPONSES_PATH: Final = "/v1/responses"
CHAT_PATH: Final = "/v1/chat/completions"
GZIP_MINIMUM_BYTES: Final = 1024
GARBAGE_BODY: Final = (
    b"upstream connect error or disconnect/reset before headers. "
    b"reset reason: connection termination"
)
_ALL_METHODS: Final = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
_STATIC_HEADERS: Final = {
    "openai-version": "2020-10-01",
    "openai-organization": "org-fakeupstream",
    "openai-project": "proj_fakeupstream",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-limit-tokens": "30000000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "29999000",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "2ms",
}
_RESPONSE_FORCED: Final[dict[Scenario, tuple[Outcome, IncompleteReason | None]]] = {
    Scenario.INCOMPLETE: ("incomplete", "max_output_tokens"),
    Scenario.CONTENT_FILTER: ("incomplete", "content_filter"),
    Scenario.FAILED: ("failed", None),
}
_CHAT_FORCED: Final[dict[Scenario, ChatOutcome]] = {
    Scenario.INCOMPLETE: "length",
    Scenario.CONTENT_FILTER: "content_filter",
    Scenario.FAILED: "failed",
}

Handler = Callable[[Request], Awaitable[Response]]


def _headers(request_id: str, started: float) -> dict[str, str]:
    elapsed_ms = int((time.perf_counter() - started) * 1000)
    return {**_STATIC_HEADERS, "x-request-id": request_id, "openai-processing-ms": str(elapsed_ms)}


def _json(body: bytes, headers: dict[str, str], status: int = 200) -> Response:
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _error_response(error: errors.OpenAIError) -> Response:
    headers = {**_STATIC_HEADERS, "x-request-id": ids.request_id(), **error.headers}
    return _json(error.body(), headers, error.status)


def _openai_errors(handler: Handler) -> Handler:
    """Render an `OpenAIError` raised by `handler` in OpenAI's shape."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except errors.OpenAIError as error:
            return _error_response(error)

    return wrapped


def _api_key(request: Request) -> str:
    """The bearer key, or OpenAI's 401: none given, or one starting with ``sk-bad``."""
    return _bearer_key(request.headers.get("authorization", ""))


def _bearer_key(authorization: str) -> str:
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise errors.no_api_key()
    if key.startswith("sk-bad"):
        raise errors.invalid_api_key(key)
    return key


class FakeUpstream:
    """State shared by the routes: usage source, stored responses and the ledger."""

    def __init__(self, seed: int | None, wire: Wire = OPENAI) -> None:
        self.wire = wire
        self.synth = UsageSynth(seed)
        self.ledger = Ledger()
        self.store = ResponseStore()
        self.batches = Batches(self)
        self.models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    Model.construct(
                        id=name, object="model", created=created, owned_by="system"
                    ).model_dump(exclude_unset=True)
                    for name, created in listed_models()
                ],
            }
        )

    # -- shared request handling ------------------------------------------------------

    def _writer(self, request: Request, key: str) -> WireWriter:
        """How this answer is spelled: the fake's wire, or the request's ``x-fake-wire``."""
        spec = request.headers.get(WIRE_HEADER)
        wire = self.wire if spec is None else parse_wire(spec, self.wire)
        return wire.writer(key)

    async def _accept(
        self, request: Request, endpoint: Endpoint
    ) -> tuple[str, Controls, RequestInfo, bytes]:
        """Authenticate, read the control headers, parse and validate; raise the HTTP
        errors a scenario asks for."""
        key = _api_key(request)
        controls = read_controls(request.headers)
        if controls.scenario is Scenario.HTTP_401:
            raise errors.invalid_api_key(key)
        raw = await request.body()
        info = read_request(parse_body(raw), endpoint)
        if controls.scenario is Scenario.HTTP_429:
            raise errors.rate_limited(info.model, info.input_chars // 4 + 1)
        if controls.scenario is Scenario.HTTP_500:
            raise errors.server_error()
        return key, controls, info, raw

    def _record(
        self,
        *,
        info: RequestInfo,
        key: str,
        object_id: str,
        model: str,
        status: str,
        plan: UsagePlan | None,
        created_at: int,
        incomplete_reason: str | None,
        error_code: str | None,
        delivered: bool,
        tier: str | None = None,
    ) -> None:
        self.ledger.record(
            LedgerEntry(
                id=object_id,
                endpoint=RESPONSES_PATH if info.endpoint == "responses" else CHAT_PATH,
                model=model,
                requested_model=info.model,
                status=status,
                incomplete_reason=incomplete_reason,
                error_code=error_code,
                **usage_columns(plan),
                service_tier=tier or info.service_tier,
                user=info.user,
                safety_identifier=info.safety_identifier,
                created_at=created_at,
                completed_at=int(time.time()),
                key_fingerprint=ids.key_fingerprint(key),
                streamed=info.stream,
                background=info.background,
                delivered=delivered,
            )
        )

    def record_response(
        self,
        draft: ResponseDraft,
        key: str,
        *,
        status: str | None = None,
        delivered: bool = True,
        tier: str | None = None,
    ) -> None:
        status = status or draft.outcome
        self._record(
            info=draft.info,
            key=key,
            object_id=draft.id,
            model=draft.model,
            status=status,
            plan=draft.billed_plan if status != "cancelled" else None,
            created_at=draft.created_at,
            incomplete_reason=draft.incomplete_reason if status == "incomplete" else None,
            error_code="server_error" if status == "failed" else None,
            delivered=delivered,
            tier=tier,
        )

    def record_chat(
        self, draft: ChatDraft, key: str, *, delivered: bool = True, tier: str | None = None
    ) -> None:
        self._record(
            tier=tier,
            info=draft.info,
            key=key,
            object_id=draft.id,
            model=draft.model,
            status=draft.status,
            plan=draft.billed_plan,
            created_at=draft.created,
            incomplete_reason=draft.incomplete_reason,
            error_code="server_error" if draft.outcome == "failed" else None,
            delivered=delivered,
        )

    # -- Responses API ----------------------------------------------------------------

    async def create_response(self, request: Request) -> Response:
        started = time.perf_counter()
        key, controls, info, raw = await self._accept(request, "responses")
        rng = self.synth.rng_for(raw)
        plan = plan_usage(info, rng)
        forced, reason = _RESPONSE_FORCED.get(controls.scenario, (None, None))
        draft = draft_response(
            info,
            plan,
            rng,
            created_at=controls.created_at or int(time.time()),
            forced=forced,
            forced_reason=reason,
        )
        headers = _headers(draft.request_id, started)
        wire = self._writer(request, draft.id)
        scenario = controls.scenario
        if scenario is Scenario.GARBAGE:
            self.record_response(draft, key, delivered=False)
            return _json(GARBAGE_BODY, headers)
        cut = scenario is Scenario.CUT
        if controls.initial_delay_s and not info.stream:
            await asyncio.sleep(controls.initial_delay_s)
        if info.background:
            return self._start_background(draft, key, controls, headers, wire)
        if info.stream:

            def finished() -> None:
                self.record_response(draft, key, delivered=not cut)
                if info.store:
                    self.store.put(draft.id, dump(draft.final()))

            if info.store:
                self.store.put(draft.id, dump(draft.pending("in_progress")))
            return self._stream(_response_frames(draft, wire), controls, headers, finished)
        body = dump(draft.final())
        self.record_response(draft, key, delivered=not cut)
        if info.store:
            self.store.put(draft.id, body)
        if cut:
            return TruncatedBody(wire.json(body), headers=headers)
        return _json(wire.json(body), headers)

    def _start_background(
        self,
        draft: ResponseDraft,
        key: str,
        controls: Controls,
        headers: dict[str, str],
        wire: WireWriter,
    ) -> Response:
        def settled(job: BackgroundJob) -> None:
            self.record_response(draft, key, status=job.status)

        job = BackgroundJob(draft, on_terminal=settled)
        self.store.put(draft.id, job)
        job.start(controls.background_delay_s)
        if draft.info.stream:
            return self._stream(_response_frames(draft, wire), controls, headers, job.finish)
        return _json(wire.json(job.body), headers)

    @staticmethod
    def _stream(
        frames: Iterator[bytes],
        controls: Controls,
        headers: dict[str, str],
        finished: Callable[[], None],
    ) -> EventStream:
        cut_after = None
        if controls.scenario is Scenario.CUT:
            materialised = list(frames)
            cut_after = max(1, len(materialised) // 2)
            frames = iter(materialised)
        return EventStream(
            frames,
            headers=headers,
            delay_s=controls.event_delay_s,
            initial_delay_s=controls.initial_delay_s,
            cut_after=cut_after,
            on_finish=finished,
        )

    async def get_response(self, request: Request) -> Response:
        started = time.perf_counter()
        _api_key(request)
        response_id = request.path_params["response_id"]
        item = self.store.get(response_id)
        if item is None:
            raise errors.response_not_found(response_id)
        headers = _headers(ids.request_id(), started)
        if isinstance(item, bytes):
            return _json(item, headers)
        if request.query_params.get("stream") == "true":
            return await self._replay(item, request, headers)
        return _json(item.body, headers)

    async def _replay(
        self, job: BackgroundJob, request: Request, headers: dict[str, str]
    ) -> Response:
        """Stream a background response's events after ``starting_after`` (once it ends)."""
        raw_after = request.query_params.get("starting_after", "-1")
        try:
            after = int(raw_after)
        except ValueError:
            raise errors.invalid_type("starting_after", "an integer", "a string") from None
        await job.done.wait()
        if job.status == "cancelled":
            return _json(job.body, headers)
        frames = (
            event_frame(getattr(event, "type", ""), dump(event))
            for event in job.draft.events()
            if getattr(event, "sequence_number", -1) > after
        )
        return EventStream(frames, headers=headers)

    async def cancel_response(self, request: Request) -> Response:
        """Cancel a background response that has not finished: it turns ``cancelled`` with
        no output and ``usage: null`` (what OpenAI reports), and the ledger bills nothing.
        Cancelling a finished one returns it unchanged, as OpenAI does (idempotent); a
        non-background response cannot be cancelled (400)."""
        started = time.perf_counter()
        _api_key(request)
        response_id = request.path_params["response_id"]
        item = self.store.get(response_id)
        if item is None:
            raise errors.response_not_found(response_id)
        if isinstance(item, bytes):
            raise errors.not_cancellable()
        item.cancel()
        return _json(item.body, _headers(ids.request_id(), started))

    # -- Chat Completions ---------------------------------------------------------------

    async def create_chat_completion(self, request: Request) -> Response:
        started = time.perf_counter()
        key, controls, info, raw = await self._accept(request, "chat")
        rng = self.synth.rng_for(raw)
        plan = plan_usage(info, rng)
        draft = draft_chat(
            info,
            plan,
            rng,
            created=controls.created_at or int(time.time()),
            forced=_CHAT_FORCED.get(controls.scenario),
        )
        headers = _headers(ids.request_id(), started)
        wire = self._writer(request, draft.id)
        scenario = controls.scenario
        if scenario is Scenario.GARBAGE:
            self.record_chat(draft, key, delivered=False)
            return _json(GARBAGE_BODY, headers)
        cut = scenario is Scenario.CUT
        if info.stream:
            return self._stream(
                _chat_frames(draft, wire),
                controls,
                headers,
                lambda: self.record_chat(draft, key, delivered=not cut),
            )
        if controls.initial_delay_s:
            await asyncio.sleep(controls.initial_delay_s)
        if draft.outcome == "failed":
            self.record_chat(draft, key)
            raise errors.server_error()
        body = wire.json(dump(draft.completion()))
        self.record_chat(draft, key, delivered=not cut)
        if cut:
            return TruncatedBody(body, headers=headers)
        return _json(body, headers)

    # -- the rest -----------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        started = time.perf_counter()
        _api_key(request)
        return _json(self.models_body, _headers(ids.request_id(), started))

    async def upload_file(self, request: Request) -> Response:
        """`POST /v1/files`: reads the multipart upload and answers a `FileObject`
        whose `bytes` is the uploaded file's size (what the proxy must pass whole)."""
        started = time.perf_counter()
        _api_key(request)
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise errors.missing_parameter("file")
        content = await upload.read()
        file = FileObject(
            id=ids.file_id(),
            bytes=len(content),
            created_at=int(time.time()),
            filename=upload.filename or "upload",
            object="file",
            purpose=str(form.get("purpose", "batch")),
            status="processed",
        )
        self.batches.files[file.id] = content
        return _json(file.model_dump_json().encode(), _headers(ids.request_id(), started))

    async def file_content(self, request: Request) -> Response:
        """`GET /v1/files/{id}/content`: an uploaded file, or a batch's output."""
        _api_key(request)
        file_id = request.path_params["file_id"]
        content = self.batches.files.get(file_id)
        if content is None:
            raise errors.OpenAIError(404, f"No such File object: {file_id}", param="id")
        return Response(content, media_type="application/octet-stream")

    async def create_batch(self, request: Request) -> Response:
        started = time.perf_counter()
        key = _api_key(request)
        controls = read_controls(request.headers)
        body = await endpoints.read_json(request)
        answer = self.batches.create(body, key, controls.background_delay_s)
        return _json(answer, _headers(ids.request_id(), started))

    async def get_batch(self, request: Request) -> Response:
        started = time.perf_counter()
        _api_key(request)
        answer = self.batches.render(request.path_params["batch_id"])
        return _json(answer, _headers(ids.request_id(), started))

    # -- organization Costs and Usage (admin keys) --------------------------------------

    async def organization_costs(self, request: Request) -> Response:
        started = time.perf_counter()
        organization.require_admin_key(_api_key(request))
        body = organization.costs_page(self.ledger, request.query_params, int(time.time()))
        return _json(body, _headers(ids.request_id(), started))

    async def organization_usage(self, request: Request) -> Response:
        started = time.perf_counter()
        organization.require_admin_key(_api_key(request))
        body = organization.usage_page(self.ledger, request.query_params, int(time.time()))
        return _json(body, _headers(ids.request_id(), started))

    # -- embeddings, legacy completions, moderations (tokentill.fakeai.endpoints) --------

    async def create_embeddings(self, request: Request) -> Response:
        started = time.perf_counter()
        key = _api_key(request)
        body = await endpoints.read_json(request)
        return _json(endpoints.embeddings(self, body, key), _headers(ids.request_id(), started))

    async def create_moderation(self, request: Request) -> Response:
        started = time.perf_counter()
        key = _api_key(request)
        body = await endpoints.read_json(request)
        return _json(endpoints.moderations(self, body, key), _headers(ids.request_id(), started))

    async def create_completion(self, request: Request) -> Response:
        started = time.perf_counter()
        key = _api_key(request)
        body = await endpoints.read_json(request)
        answer, draft = endpoints.completion(self, body, key)
        headers = _headers(ids.request_id(), started)
        if body.get("stream") is not True:
            return _json(answer, headers)
        wire = self._writer(request, draft.id)
        frames: list[bytes] = []
        for chunk in draft.chunks():
            frames.extend(wire.frame(None, dump(chunk)))
        frames.extend(wire.frame(None, b"[DONE]"))
        return EventStream(frames, headers=headers)

    # -- images and audio (tokentill.fakeai.media) ----------------------------------------

    async def _fields(self, request: Request) -> tuple[dict[str, object], int, int]:
        """A JSON body's or a form's fields, how many files it carried, and their bytes."""
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return parse_body(await request.body()), 0, 0
        try:
            form = await request.form()
        except (MultiPartException, HTTPException):
            raise errors.OpenAIError(400, "Could not parse multipart form") from None
        fields: dict[str, object] = {}
        files = size = 0
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files += 1
                size += len(await value.read())
            else:
                fields.setdefault(name, value)
        return fields, files, size

    def _typed_stream(
        self, request: Request, key: str, events: Iterator[tuple[str, bytes]]
    ) -> Response:
        wire = self._writer(request, key)
        frames: list[bytes] = []
        for event_type, payload in events:
            frames.extend(wire.frame(event_type, payload))
        return EventStream(frames, headers=_headers(ids.request_id(), time.perf_counter()))

    async def create_images(self, request: Request) -> Response:
        started = time.perf_counter()
        key = _api_key(request)
        fields, files, _ = await self._fields(request)
        path = request.url.path
        if path != media.IMAGES_GENERATIONS_PATH and not files:
            raise errors.missing_parameter("image")
        draft = media.image_draft(path, fields, files)
        media.bill_images(self, key, draft, fields)
        if draft.stream:
            return self._typed_stream(request, key, draft.events())
        return _json(dump(draft.whole()), _headers(ids.request_id(), started))

    async def create_transcription(self, request: Request) -> Response:
        started = time.perf_counter()
        key = _api_key(request)
        fields, _, size = await self._fields(request)
        draft = media.transcription_draft(request.url.path, fields, size)
        media.bill_transcription(self, key, draft, fields)
        if draft.stream:
            return self._typed_stream(request, key, draft.events())
        body, content_type = draft.whole()
        headers = _headers(ids.request_id(), started)
        return Response(body, headers=headers, media_type=content_type)

    async def create_speech(self, request: Request) -> Response:
        started = time.perf_counter()
        key = _api_key(request)
        fields = parse_body(await request.body())
        draft = media.speech_draft(fields)
        media.bill_speech(self, key, draft, fields)
        if draft.sse:
            return self._typed_stream(request, key, draft.events())
        headers = _headers(ids.request_id(), started)
        return StreamingResponse(draft.chunks(), headers=headers, media_type=draft.content_type)

    async def responses_socket(self, websocket: WebSocket) -> None:
        """The Responses API's WebSocket mode (see `tokentill.fakeai.socket`)."""
        await serve_socket(self, websocket, _bearer_key, _error_response, _RESPONSE_FORCED)

    async def realtime_socket(self, websocket: WebSocket) -> None:
        """The Realtime API (see `tokentill.fakeai.realtime`)."""
        await serve_realtime(self, websocket, _bearer_key, _error_response)

    async def get_ledger(self, request: Request) -> Response:
        return _json(self.ledger.to_json(), {})

    async def clear_ledger(self, request: Request) -> Response:
        return _json(orjson.dumps({"deleted": self.ledger.clear()}), {})

    async def unknown_route(self, request: Request) -> Response:
        raise errors.unknown_url(request.method, request.url.path)


def _response_frames(draft: ResponseDraft, wire: WireWriter) -> Iterator[bytes]:
    for event in draft.events():
        if wire.wire.is_openai:
            yield event_frame(getattr(event, "type", ""), dump(event))
        else:
            yield from wire.frame(getattr(event, "type", ""), dump(event))


def _chat_frames(draft: ChatDraft, wire: WireWriter) -> Iterator[bytes]:
    for chunk in draft.chunks():
        payload = chunk if isinstance(chunk, bytes) else dump(chunk)
        if wire.wire.is_openai:
            yield data_frame(payload)
        else:
            yield from wire.frame(None, payload)
    if draft.outcome != "failed":
        if wire.wire.is_openai:
            yield DONE_FRAME
        else:
            yield from wire.frame(None, b"[DONE]")


def _warm_up(fake: FakeUpstream) -> None:
    """Build the SDK models' serializers now rather than on the first request."""
    rng = fake.synth.rng_for(b"")
    responses = read_request(
        {"model": "o4-mini", "input": "hi", "tools": [{"type": "web_search"}]}, "responses"
    )
    for event in draft_response(responses, plan_usage(responses, rng), rng, created_at=0).events():
        dump(event)
    chat = read_request(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "chat"
    )
    draft = draft_chat(chat, plan_usage(chat, rng), rng, created=0)
    dump(draft.completion())
    list(_chat_frames(draft, OPENAI.writer("")))


def create_fake_app(*, seed: int | None = None, wire: Wire = OPENAI) -> Starlette:
    """A fresh fake OpenAI upstream (its own ledger and store); `seed` makes the usage
    numbers reproducible for a given sequence of requests; `wire` is how it spells its
    answers (OpenAI's compact style by default; see `tokentill.fakeai.wire`)."""
    fake = FakeUpstream(seed, wire)
    _warm_up(fake)
    fake.synth = UsageSynth(seed)  # warm-up must not shift the seeded sequence
    routes = [
        Route(RESPONSES_PATH, _openai_errors(fake.create_response), methods=["POST"]),
        WebSocketRoute(RESPONSES_PATH, fake.responses_socket),
        WebSocketRoute(REALTIME_PATH, fake.realtime_socket),
        Route(
            RESPONSES_PATH + "/{response_id}",
            _openai_errors(fake.get_response),
            methods=["GET"],
        ),
        Route(
            RESPONSES_PATH + "/{response_id}/cancel",
            _openai_errors(fake.cancel_response),
            methods=["POST"],
        ),
        Route(CHAT_PATH, _openai_errors(fake.create_chat_completion), methods=["POST"]),
        Route(endpoints.EMBEDDINGS_PATH, _openai_errors(fake.create_embeddings), methods=["POST"]),
        Route(endpoints.COMPLETIONS_PATH, _openai_errors(fake.create_completion), methods=["POST"]),
        Route(endpoints.MODERATIONS_PATH, _openai_errors(fake.create_moderation), methods=["POST"]),
        *(
            Route(path, _openai_errors(fake.create_images), methods=["POST"])
            for path in (
                media.IMAGES_GENERATIONS_PATH,
                media.IMAGES_EDITS_PATH,
                media.IMAGES_VARIATIONS_PATH,
            )
        ),
        *(
            Route(path, _openai_errors(fake.create_transcription), methods=["POST"])
            for path in (media.TRANSCRIPTIONS_PATH, media.TRANSLATIONS_PATH)
        ),
        Route(media.SPEECH_PATH, _openai_errors(fake.create_speech), methods=["POST"]),
        Route("/v1/models", _openai_errors(fake.list_models), methods=["GET"]),
        Route("/v1/files", _openai_errors(fake.upload_file), methods=["POST"]),
        Route("/v1/files/{file_id}/content", _openai_errors(fake.file_content), methods=["GET"]),
        Route("/v1/batches", _openai_errors(fake.create_batch), methods=["POST"]),
        Route("/v1/batches/{batch_id}", _openai_errors(fake.get_batch), methods=["GET"]),
        Route("/v1/organization/costs", _openai_errors(fake.organization_costs), methods=["GET"]),
        Route(
            "/v1/organization/usage/completions",
            _openai_errors(fake.organization_usage),
            methods=["GET"],
        ),
        Route("/_fake/ledger", fake.get_ledger, methods=["GET"]),
        Route("/_fake/ledger", fake.clear_ledger, methods=["DELETE"]),
        Route("/{path:path}", _openai_errors(fake.unknown_route), methods=_ALL_METHODS),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(GZipMiddleware, minimum_size=GZIP_MINIMUM_BYTES, compresslevel=1)],
    )
    app.state.fake = fake
    return app
