"""`tokentill demo`: the service in front of the built-in fake upstream, showing every
feature within a minute of starting.

First a showcase (`Showcase.run`), all of it sent through the proxy with the official
openai SDK:
- thirty days of history, backdated with the fake upstream's `x-fake-created-at`, with a
  weekly and a daily rhythm: dozens of end users (a few heavy, most light), models with
  cached input and reasoning, one model no price list knows, metadata tags (team,
  feature, customer), conversations (`previous_response_id` chains);
- a price change in the middle of the month (an override from fifteen days ago);
- the jobs run at once (the rollup, then the abuse job);
- quotas: a user near a hard limit, one over it (its requests refused with 429), a soft
  limit past its threshold, a limit on a team;
- an abusive new user: a burst and a content-filter storm, flagged on the first run.
Then live traffic (`generate_traffic`): plain, streamed, background and Chat Completions
calls, every scenario the fake plays (incomplete, content filter, failures, HTTP errors,
streams cut off), agents' tool loops over HTTP and the Responses WebSocket mode.

The console shows one status line, updated in place, instead of a line per request.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, cast

import httpx
import openai
import uvicorn

from tokentill.fakeai import create_fake_app

log = logging.getLogger("tokentill.demo")

USERS = 48
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


def user_names(count: int = USERS) -> tuple[list[str], list[float]]:
    """The demo's end users, and how much each uses the service (a few heavy users, a
    long tail)."""
    names = [f"user-{i:03d}" for i in range(1, count + 1)]
    return names, [1.0 / (i**1.1) for i in range(1, count + 1)]


def generate_traffic(
    base_url: str,
    *,
    rate: float,
    stop: threading.Event,
    seed: int = 1,
    progress: Progress | None = None,
) -> int:
    """Send calls at about `rate` per second until `stop` is set; return how many."""
    rng = random.Random(seed)
    names, weights = user_names()
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="sk-demo", max_retries=0)
    progress = progress or Progress()
    sent = 0
    while not stop.is_set():
        started = time.monotonic()
        # The error scenarios are meant to fail; tokentill records them.
        with progress.calling():
            make_call(client, plan_call(rng, names, weights))
        sent += 1
        stop.wait(max(0.0, 1.0 / rate - (time.monotonic() - started)))
    return sent


def start_fake_upstream(host: str, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    """The fake upstream in a thread of its own: its server (`should_exit` stops it) and
    the thread, to join before the process ends."""
    config = uvicorn.Config(
        create_fake_app(seed=42), host=host, port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="demo-fake-upstream", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the fake upstream did not start")
        time.sleep(0.05)
    return server, thread


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


HOUSE_MODEL = "acme-house-model"  # a model no price list knows: unpriced, called out
HISTORY_MODELS = (
    ("gpt-4o-mini", 30),
    ("gpt-4.1-mini", 20),
    ("gpt-4o", 10),
    ("o4-mini", 10),  # reasoning
    ("gpt-5-mini", 10),  # reasoning
    ("gpt-4.1", 6),
    (HOUSE_MODEL, 4),
)
# Requests an hour of the day (UTC) weighs: a working day's rhythm.
_HOURS = [1, 1, 1, 1, 1, 2, 4, 7, 10, 12, 12, 11, 9, 11, 12, 12, 10, 8, 6, 4, 3, 2, 2, 1]


class Progress:
    """What the demo has done, for its status line (counted from several threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.refused = 0
        self.failed = 0
        self.stage = "starting"

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """One call: counted; a refusal (429 or 403 from tokentill's quotas) or another
        error counted as such, never raised (the error scenarios are meant to fail)."""
        outcome = "sent"
        try:
            yield
        except openai.APIStatusError as exc:
            outcome = "refused" if _tokentill_refused(exc) else "failed"
        except (openai.APIError, OSError):
            outcome = "failed"
        with self._lock:
            self.sent += 1
            if outcome == "refused":
                self.refused += 1
            elif outcome == "failed":
                self.failed += 1


def _tokentill_refused(exc: openai.APIStatusError) -> bool:
    try:
        code = exc.response.json().get("error", {}).get("code")
    except ValueError:
        return False
    return code in ("user_quota_exceeded", "insufficient_quota", "user_temporarily_blocked")


def _midnight(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


class Showcase:
    """Everything the dashboard can show, set up through the proxy and the admin API."""

    def __init__(self, base_url: str, progress: Progress, seed: int = 7) -> None:
        self._base = base_url
        self._progress = progress
        self._rng = random.Random(seed)
        self._admin = httpx.Client(base_url=base_url, timeout=120)
        self._client = openai.OpenAI(base_url=base_url + "/v1", api_key="sk-demo", max_retries=0)

    def run(self, days: int = 30) -> None:
        progress = self._progress
        progress.stage = "a price change in mid-month"
        self._price_change(days)
        progress.stage = f"sending {days} days of history"
        self._history(days)
        progress.stage = "this hour's users"
        self._this_hour()
        progress.stage = "an abusive new user"
        self._abuse()
        progress.stage = "rolling up"
        self._post("/api/jobs/rollup/run", {"full": "true"})
        progress.stage = "setting quotas"
        self._quotas()
        progress.stage = "scoring users"
        self._post("/api/jobs/abuse/run", {})
        progress.stage = "live traffic"

    def _post(self, path: str, params: dict[str, str]) -> None:
        answer = self._admin.post(path, params=params)
        if answer.status_code != 200:
            log.warning("demo: POST %s answered %d: %s", path, answer.status_code, answer.text)

    def _price_change(self, days: int) -> None:
        since = _midnight(datetime.now(UTC)) - timedelta(days=days // 2)
        price = {
            "model": "gpt-4.1-mini",
            "effective_from": since.isoformat(),
            "input_per_mtok": "0.30",
            "cached_input_per_mtok": "0.075",
            "output_per_mtok": "1.20",
            "note": "demo: a negotiated rate from mid-month",
        }
        answer = self._admin.post("/api/prices", json={"author": "demo", "prices": [price]})
        if answer.status_code != 201:
            log.warning("demo: the price change was refused: %s", answer.text)

    def _history(self, days: int) -> None:
        """Backdated calls, a weekly and a daily rhythm, conversations among them."""
        rng = self._rng
        names, weights = user_names()
        now = datetime.now(UTC)
        plans: list[tuple[str, str, datetime, int]] = []
        for ago in range(days - 1, -1, -1):
            day = _midnight(now) - timedelta(days=ago)
            weekend = day.weekday() >= 5
            count = int(rng.uniform(24, 34) * (0.45 if weekend else 1.0))
            for _ in range(count):
                at = day + timedelta(
                    hours=rng.choices(range(24), _HOURS)[0], minutes=rng.randrange(60)
                )
                if at >= now - timedelta(minutes=2):
                    continue  # not in the future
                model = rng.choices([m for m, _ in HISTORY_MODELS], [w for _, w in HISTORY_MODELS])[
                    0
                ]
                turns = rng.choice((1, 1, 1, 1, 3, 4))  # some are conversations
                plans.append((rng.choices(names, weights)[0], model, at, turns))
        with ThreadPoolExecutor(8, thread_name_prefix="demo-history") as pool:
            list(pool.map(lambda plan: self._conversation(*plan), plans))

    def _conversation(self, user: str, model: str, at: datetime, turns: int) -> None:
        team = TEAMS[hash(user) % len(TEAMS)]
        metadata = {"team": team, "feature": "chat", "customer": CUSTOMERS[len(user) % 6]}
        previous: Any = openai.omit
        for turn in range(turns):
            created = int((at + timedelta(minutes=3 * turn)).timestamp())
            with self._progress.calling():
                response = self._client.responses.create(
                    model=model,
                    input="Tell me more. " * (20 + 30 * turn),
                    user=user,
                    metadata=metadata,
                    previous_response_id=previous,
                    extra_headers={"x-fake-created-at": str(min(created, int(time.time())))},
                )
                previous = response.id

    def _this_hour(self, users: int = 30) -> None:
        """One ordinary call each by many users right now: the population a new user is
        scored against (the live traffic keeps it up afterwards)."""
        names, _ = user_names()

        def call(user: str) -> None:
            self._conversation(user, "gpt-4o-mini", datetime.now(UTC), 1)  # the usual

        with ThreadPoolExecutor(8, thread_name_prefix="demo-now") as pool:
            list(pool.map(call, names[:users]))

    def _abuse(self) -> None:
        """A new account: a burst (45 calls in seconds), then a content-filter storm."""
        user = "user-new-suspicious"

        def call(i: int) -> None:
            scenario = {"x-fake-scenario": "content_filter"} if i >= 45 else {}
            with self._progress.calling():
                self._client.responses.create(
                    model="gpt-4o-mini", input="x" * 50, user=user, extra_headers=scenario
                )

        with ThreadPoolExecutor(8, thread_name_prefix="demo-abuse") as pool:
            list(pool.map(call, range(65)))

    def _spend_by_user(self, days: int) -> list[tuple[str, Decimal]]:
        since = _midnight(datetime.now(UTC)) - timedelta(days=days)
        answer = self._admin.get(
            "/api/costs", params={"group_by": ["user"], "start": since.date().isoformat()}
        )
        rows = answer.json().get("rows", []) if answer.status_code == 200 else []
        return [
            (r["group"]["user"], Decimal(r["priced_cost_usd"]))
            for r in rows
            if r["group"]["user"] and r["group"]["user"].startswith("user-0")
        ]

    def _quotas(self) -> None:
        """Budgets for the whole pilot (`total`): one near its hard limit (85% used), one
        over it (its calls refused), a soft limit past its threshold; and a team's daily
        request limit. Set on users with history, below the heaviest (who keeps going)."""
        spenders = [(u, spent) for u, spent in self._spend_by_user(31) if spent > 0][1:]
        plans = zip(
            spenders[::3],
            (("hard", Decimal("0.85")), ("hard", Decimal("1.6")), ("soft", Decimal("1.1"))),
            strict=False,
        )
        for (user, spent), (mode, used_share) in plans:
            limit = (spent / used_share).quantize(Decimal("0.000001"))
            body = {"period": "total", "mode": mode, "limit_usd": str(limit)}
            answer = self._admin.put(f"/api/quotas/users/{user}", json=body)
            if answer.status_code != 200:
                log.warning("demo: quota on %s refused: %s", user, answer.text)
                continue
            # The report's 31 days are not all a `total` limit counts (the quota counts
            # every event ever, to this second): set it again on the quota's own count,
            # so that "near" is 85% used and stays under its hard limit.
            with contextlib.suppress(KeyError, IndexError, TypeError, ValueError):
                used = Decimal(str(answer.json()["limits"][0]["used"]))
                if used > 0:
                    body["limit_usd"] = str((used / used_share).quantize(Decimal("0.000001")))
                    self._admin.put(f"/api/quotas/users/{user}", json=body)
        self._admin.put(
            "/api/quotas/tags/team/research", json={"period": "day", "limit_requests": 400}
        )


def status_line(base_url: str, progress: Progress) -> str:
    """One line: what was sent and refused, what was spent, where to look."""
    spent = "…"
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        totals = httpx.get(base_url + "/api/costs", timeout=2).json()["totals"]
        spent = f"${Decimal(totals['priced_cost_usd']):,.2f} in 30 days (rolled up)"
    return (
        f"tokentill demo: {progress.stage} · {progress.sent:,} calls, "
        f"{progress.refused:,} refused by quotas, {progress.failed:,} failed · {spent} · "
        f"dashboard {base_url}/dashboard/"
    )


def show_status(base_url: str, progress: Progress, stop: threading.Event) -> None:
    """Rewrite the status line in place every second (a line every 15 s when the output
    is not a terminal)."""
    tty = sys.stdout.isatty()
    last = 0.0
    while not stop.wait(1.0):
        line = status_line(base_url, progress)
        if tty:
            sys.stdout.write("\r\x1b[2K" + line)
            sys.stdout.flush()
        elif time.monotonic() - last >= 15:
            print(line, flush=True)
            last = time.monotonic()
    if tty:
        sys.stdout.write("\n")
