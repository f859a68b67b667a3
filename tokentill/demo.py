"""`tokentill demo`: the service in front of the built-in fake upstream, with traffic.

A newcomer without an OpenAI key sees real data flowing within a minute: dozens of end
users (a few heavy, most light), several models and service tiers, metadata tags (team,
feature, customer), plain, streamed, background and Chat Completions calls, and every
scenario the fake upstream plays (incomplete, content filter, failures, HTTP errors,
streams cut off), and agents running tool loops (a chain of responses with function
calls linked by `previous_response_id`, over HTTP and over the Responses WebSocket
mode), all through the official openai SDK.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

import httpx
import openai
import uvicorn

from tokentill.fakeai import create_fake_app

log = logging.getLogger("tokentill.demo")

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "o4-mini", "gpt-5", "gpt-5-mini")
TEAMS = ("search", "support", "growth", "research")
FEATURES = ("chat", "summarize", "classify", "agent", "autocomplete")
CUSTOMERS = ("acme", "globex", "initech", "umbrella", "hooli", "stark")
# (scenario header, weight): most calls succeed, some go wrong in every way there is.
SCENARIOS = (
    (None, 900),
    ("incomplete", 30),
    ("content_filter", 15),
    ("failed", 10),
    ("http_429", 15),
    ("http_500", 5),
    ("http_401", 3),
    ("cut", 5),
)


@dataclass(frozen=True)
class Call:
    user: str
    model: str
    metadata: dict[str, str]
    scenario: str | None
    kind: str  # responses[-stream|-background] | chat[-stream] | agent | agent-websocket
    service_tier: str
    web_search: bool


def plan_call(rng: random.Random, users: list[str], weights: list[float]) -> Call:
    user = rng.choices(users, weights)[0]
    scenario = rng.choices([s for s, _ in SCENARIOS], [w for _, w in SCENARIOS])[0]
    team = TEAMS[hash(user) % len(TEAMS)]
    return Call(
        user=user,
        model=rng.choice(MODELS),
        metadata={
            "team": team,
            "feature": rng.choice(FEATURES),
            "customer": rng.choice(CUSTOMERS),
        },
        scenario=scenario,
        kind=rng.choices(
            [
                "responses",
                "responses-stream",
                "responses-background",
                "chat",
                "chat-stream",
                "agent",
                "agent-websocket",
            ],
            [40, 25, 5, 20, 10, 4, 2],
        )[0],
        service_tier=rng.choices(["auto", "flex", "priority"], [85, 10, 5])[0],
        web_search=rng.random() < 0.05,
    )


AGENT_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "lookup_order",
    "description": "Look an order up by its number.",
    "parameters": {
        "type": "object",
        "properties": {"order": {"type": "string"}, "detail": {"type": "boolean"}},
        "required": ["order", "detail"],
        "additionalProperties": False,
    },
    "strict": True,
}


def agent_loop(client: openai.OpenAI, call: Call, *, websocket: bool) -> None:
    """An agent's tool loop: the model calls the tool (twice for a longer chain), gets
    its output back through `previous_response_id`, and answers."""
    turns = 1 + len(call.user) % 2  # tool calls before the answer
    metadata = {**call.metadata, "feature": "agent"}
    inputs: Any = "Where is my order?"
    previous: Any = openai.omit
    if websocket:
        with client.responses.connect() as connection:
            for turn in range(turns + 1):
                connection.response.create(
                    model="gpt-4.1-mini",
                    tools=[AGENT_TOOL],  # type: ignore[list-item]
                    tool_choice="required" if turn < turns else "auto",
                    user=call.user,
                    metadata=metadata,
                    input=inputs,
                    previous_response_id=previous,
                )
                for event in connection:
                    if event.type == "error":
                        return
                    if event.type == "response.completed":
                        previous, inputs = event.response.id, _tool_outputs(event.response)
                        break
        return
    for turn in range(turns + 1):
        choice: Literal["required", "auto"] = "required" if turn < turns else "auto"
        response = client.responses.create(
            model="gpt-4.1-mini",
            tools=[cast(Any, AGENT_TOOL)],
            tool_choice=choice,
            user=call.user,
            metadata=metadata,
            input=inputs,
            previous_response_id=previous,
        )
        previous, inputs = response.id, _tool_outputs(response)


def _tool_outputs(response: Any) -> list[dict[str, str]]:
    return [
        {"type": "function_call_output", "call_id": item.call_id, "output": "shipped"}
        for item in response.output
        if item.type == "function_call"
    ]


def make_call(client: openai.OpenAI, call: Call) -> None:
    if call.kind.startswith("agent"):
        agent_loop(client, call, websocket=call.kind == "agent-websocket")
        return
    headers = {"x-fake-scenario": call.scenario} if call.scenario else {}
    prompt = "Write a short note about " + random.choice(FEATURES) * random.randint(1, 40)
    common: dict[str, Any] = {"model": call.model, "extra_headers": headers}
    if call.kind.startswith("responses"):
        tools: list[Any] = [{"type": "web_search"}] if call.web_search else []
        request: dict[str, Any] = {
            **common,
            "input": prompt,
            "user": call.user,
            "metadata": call.metadata,
            "service_tier": call.service_tier,
            "tools": tools,
        }
        if call.kind == "responses-stream":
            for _ in client.responses.create(**request, stream=True):
                pass
        elif call.kind == "responses-background":
            client.responses.create(**request, background=True)
        else:
            client.responses.create(**request)
        return
    messages: list[Any] = [{"role": "user", "content": prompt}]
    if call.kind == "chat-stream":
        for _ in client.chat.completions.create(
            **common, messages=messages, user=call.user, stream=True
        ):
            pass
    else:
        client.chat.completions.create(
            **common, messages=messages, user=call.user, metadata=call.metadata, store=True
        )


def generate_traffic(
    base_url: str, *, rate: float, stop: threading.Event, seed: int = 1, users: int = 48
) -> int:
    """Send calls at about `rate` per second until `stop` is set; return how many."""
    rng = random.Random(seed)
    names = [f"user-{i:03d}" for i in range(1, users + 1)]
    weights = [1.0 / (i**1.1) for i in range(1, users + 1)]  # a few heavy users, a long tail
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="sk-demo", max_retries=0)
    sent = 0
    while not stop.is_set():
        started = time.monotonic()
        # The error scenarios are meant to fail; tokentill records them.
        with contextlib.suppress(openai.APIError, OSError):
            make_call(client, plan_call(rng, names, weights))
        sent += 1
        if sent % 100 == 0:
            log.info("demo traffic: %d calls sent", sent)
        stop.wait(max(0.0, 1.0 / rate - (time.monotonic() - started)))
    return sent


def start_fake_upstream(host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(
        create_fake_app(seed=42), host=host, port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, name="demo-fake-upstream", daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the fake upstream did not start")
        time.sleep(0.05)
    return server


def wait_healthy(url: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False
