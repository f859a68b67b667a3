"""Quotas across proxies: three real `tokentill serve --role proxy` processes and an api on
one lake (a real PostgreSQL), their counters in a real Redis. A hard limit holds for all of
them as it does for one process; limit changes and blocks reach every proxy; Redis lost is
refused in OpenAI's shape, and Redis restarted empty is rebuilt from the lake."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.cluster import Instance, in_lake, wait_for
from tests.servers import serve_in_thread
from tests.services import Redis, redis_server
from tests.test_quotas import Receiver
from tokentill.settings import Settings
from tokentill.warehouse.lake import LakeConfig, connect
from tokentill.warehouse.quota_store import used_before

PICO = 10**12


@pytest.fixture
def store() -> Iterator[Redis]:
    with redis_server() as server:
        yield server


def _start(
    lake: LakeConfig, upstream: str, store: Redis, home: Path, name: str, role: str, **more: str
) -> Instance:
    return Instance(
        lake,
        upstream,
        name,
        home / name,
        role,
        quotas_enabled="true",
        redis_url=store.url,
        **more,
    )


def _cluster(
    lake: LakeConfig, upstream: str, store: Redis, home: Path, proxies: list[Instance]
) -> tuple[list[Instance], Instance]:
    # The worker first: the price catalog is its to load, and the proxies price with it.
    proxies.append(_start(lake, upstream, store, home, "worker-1", "worker"))
    meters = [_start(lake, upstream, store, home, f"proxy-{n}", "proxy") for n in "abc"]
    api = _start(lake, upstream, store, home, "api-1", "api")
    proxies.extend([*meters, api])
    return meters, api


def _put(api: Instance, path: str, limits: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.put(f"{api.url}/api/quotas/{path}", json=limits, timeout=60)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _quota(api: Instance, path: str) -> dict[str, Any]:
    answer = httpx.get(f"{api.url}/api/quotas/{path}", timeout=60)
    assert answer.status_code == 200, answer.text
    (state,) = answer.json()["limits"]
    found: dict[str, Any] = state
    return found


def _pico(text: str) -> int:
    return int(Decimal(text) * PICO)


def _every_proxy_has(meters: list[Instance], version: int) -> bool:
    return all(m.health().get("quota_limits_version", -1) >= version for m in meters)


def _version(api: Instance) -> int:
    return int(api.health()["quota_limits_version"])


def _lake_cost(lake: LakeConfig, user: str) -> tuple[int, int]:
    """What the lake says `user` spent today (pico-dollars) in how many requests, priced
    as the quota prices it."""
    conn = connect(lake)
    try:
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        found = used_before(
            conn,
            recorded_before=datetime(2100, 1, 1, tzinfo=UTC),
            window_start=today,
            image_model=Settings().image_gen_model,
            users=[user],
        )
    finally:
        conn.close()
    return (found[0].pico, found[0].requests) if found else (0, 0)


def _lake_count(lake: LakeConfig, where: str, params: list[Any]) -> int:
    [(count,)] = in_lake(lake, f"SELECT count(*) FROM usage_events WHERE {where}", params)
    return int(count)


def test_a_hard_limit_holds_across_three_proxies(
    lake: LakeConfig, fake_upstream: str, store: Redis, proxies: list[Instance], tmp_path: Path
) -> None:
    """One user with about a cent left fires 100 requests at once, spread over three
    proxies: the bound of one process holds (0: each request states its output bound)."""
    meters, api = _cluster(lake, fake_upstream, store, tmp_path, proxies)
    user = "hasty"
    meters[0].client().responses.create(
        model="gpt-5", input="warm up", user=user, max_output_tokens=256
    )
    # A generous limit first: its window is read from the lake, warm-up included.
    _put(api, f"users/{user}", {"limit_usd": "100", "period": "day"})
    spent = _pico(_quota(api, f"users/{user}")["used"])
    assert (spent, 1) == _lake_cost(lake, user) and spent > 0
    limit = spent + _pico("0.01")
    _put(api, f"users/{user}", {"limit_usd": str(Decimal(limit) / PICO), "period": "day"})
    version = _version(api)
    propagated = wait_for(lambda: _every_proxy_has(meters, version), 10, "limits reach proxies")

    async def fire() -> list[bool]:
        clients = [
            openai.AsyncOpenAI(base_url=m.url + "/v1", api_key="sk-test", max_retries=0)
            for m in meters
        ]

        async def one(i: int) -> bool:
            try:
                await clients[i % 3].responses.create(
                    model="gpt-5", input=f"question {i}", user=user, max_output_tokens=256
                )
            except openai.RateLimitError as exc:
                assert exc.code == "user_quota_exceeded"
                return False
            return True

        try:
            return await asyncio.gather(*(one(i) for i in range(100)))
        finally:
            for client in clients:
                await client.close()

    served = asyncio.run(fire())
    assert 0 < sum(served) < 100
    wait_for(
        lambda: _lake_count(lake, "user_id = ?", [user]) == 101, 60, "every request in the lake"
    )
    total, requests = _lake_cost(lake, user)
    print(
        f"served {sum(served)} of 100 over 3 proxies; spent ${Decimal(total) / PICO} of "
        f"${Decimal(limit) / PICO}; the limit reached every proxy within {propagated:.2f} s"
    )
    assert total <= limit  # the bound of one process: 0
    assert _lake_count(lake, "user_id = ? AND http_status = 429", [user]) == 100 - sum(served)

    # Redis holds what the lake holds: every settlement arrived, nothing is left reserved.
    def settled() -> bool:
        state = _quota(api, f"users/{user}")
        return _pico(state["used"]) == total and _pico(state["reserved"]) == 0

    wait_for(settled, 30, "the shared counters equal the lake")
    assert requests == 1 + sum(served)  # priced events: refusals are not counted


def test_limit_changes_reach_every_proxy(
    lake: LakeConfig, fake_upstream: str, store: Redis, proxies: list[Instance], tmp_path: Path
) -> None:
    meters, api = _cluster(lake, fake_upstream, store, tmp_path, proxies)
    user = "late"

    for meter in meters:
        meter.client().responses.create(model="gpt-4o-mini", input="x", user=user)
    _put(api, f"users/{user}", {"limit_requests": 3, "period": "day"})
    took = wait_for(
        lambda: _refused_everywhere(meters, user, openai.RateLimitError, "user_quota_exceeded"),
        10,
        "a new limit refuses on every proxy",
    )
    print(f"a limit change refused on all 3 proxies within {took:.2f} s")
    assert _quota(api, f"users/{user}")["used"] == "3"
    # Raised: served again everywhere.
    _put(api, f"users/{user}", {"limit_requests": 100, "period": "day"})
    version = _version(api)
    wait_for(lambda: _every_proxy_has(meters, version), 10, "the raised limit reaches proxies")
    for meter in meters:
        meter.client().responses.create(model="gpt-4o-mini", input="x", user=user)


def _refused_everywhere(
    meters: list[Instance], user: str, kind: type[openai.APIStatusError], code: str
) -> bool:
    for meter in meters:
        try:
            meter.client().responses.create(model="gpt-4o-mini", input="x", user=user)
            return False
        except kind as exc:
            assert exc.code == code
    return True


def test_an_abuse_block_holds_on_every_proxy_and_its_webhook_goes_once_across_a_takeover(
    lake: LakeConfig, fake_upstream: str, store: Redis, proxies: list[Instance], tmp_path: Path
) -> None:
    """A content-filter storm through three proxies: the active worker's abuse job flags
    it (critical), the user is blocked on every proxy, the webhook is sent; the worker is
    SIGKILLed, the standby takes over and runs the job again: no alert is sent twice."""
    hook = Receiver(failures=0)
    with serve_in_thread(hook.app) as url:
        jobs = {
            "abuse_interval": "2",
            "abuse_block_seconds": "600",
            "alert_webhook_url": url + "/hook",
        }
        active = _start(lake, fake_upstream, store, tmp_path, "worker-a", "worker", **jobs)
        proxies.append(active)
        wait_for(lambda: active.health().get("worker") == "active", 30, "a worker leads")
        standby = _start(lake, fake_upstream, store, tmp_path, "worker-b", "worker", **jobs)
        proxies.append(standby)
        meters = [_start(lake, fake_upstream, store, tmp_path, f"p-{n}", "proxy") for n in "abc"]
        api = _start(lake, fake_upstream, store, tmp_path, "api-1", "api")
        proxies.extend([*meters, api])

        for i in range(12):
            scenario = "content_filter" if i < 8 else "completed"
            meters[i % 3].client().responses.create(
                model="gpt-4o-mini", input="hi", user="stormy",
                extra_headers={"x-fake-scenario": scenario},
            )  # fmt: skip

        # Waited for without sending more (served requests would dilute the storm).
        def blocked() -> list[str]:
            listed = httpx.get(f"{api.url}/api/quotas/blocks", timeout=30).json()
            return [b["user_id"] for b in listed]

        wait_for(lambda: blocked() == ["stormy"], 60, "the worker's flag blocks the user")
        wait_for(
            lambda: _refused_everywhere(
                meters, "stormy", openai.PermissionDeniedError, "user_temporarily_blocked"
            ),
            10,
            "the block refuses on every proxy",
        )
        meters[0].client().responses.create(model="gpt-4o-mini", input="x", user="calm")

        def sent() -> list[str]:
            return [orjson.loads(body)["dedupe_key"] for _, body in hook.attempts]

        wait_for(lambda: bool(sent()), 30, "the flag's webhook")
        killed_at = datetime.now(UTC)
        active.stop(signal.SIGKILL)
        wait_for(lambda: standby.health().get("worker") == "active", 30, "takeover")
        wait_for(
            lambda: _abuse_runs_since(lake, killed_at) >= 2,
            60,
            "the standby runs the abuse job, twice",
        )
        flagged = sent()
        assert flagged and len(flagged) == len(set(flagged)), flagged

        # Lifted through the api: served again on every proxy.
        lifted = httpx.delete(f"{api.url}/api/quotas/blocks/stormy", timeout=30)
        assert lifted.status_code == 204

        def served_everywhere() -> bool:
            try:
                for meter in meters:
                    meter.client().responses.create(model="gpt-4o-mini", input="x", user="stormy")
            except openai.PermissionDeniedError:
                return False
            return True

        wait_for(served_everywhere, 10, "a lifted block serves on every proxy")


def _abuse_runs_since(lake: LakeConfig, moment: datetime) -> int:
    [(count,)] = in_lake(
        lake,
        """SELECT count(*) FROM job_runs
           WHERE job = 'abuse' AND started_at > ? AND finished_at IS NOT NULL""",
        [moment],
    )
    return int(count)


def test_redis_lost_refuses_in_openais_shape_and_restarted_empty_is_rebuilt(
    lake: LakeConfig, fake_upstream: str, store: Redis, proxies: list[Instance], tmp_path: Path
) -> None:
    meters, api = _cluster(lake, fake_upstream, store, tmp_path, proxies)
    lenient = _start(
        lake, fake_upstream, store, tmp_path, "proxy-lenient", "proxy", quota_redis_outage="serve"
    )
    proxies.append(lenient)
    user = "steady"
    _put(api, f"users/{user}", {"limit_requests": 6, "period": "day"})
    _put(api, "tags/customer/acme", {"limit_requests": 100, "period": "month"})
    version = _version(api)
    wait_for(lambda: _every_proxy_has([*meters, lenient], version), 10, "limits reach proxies")
    for meter in meters:
        meter.client().responses.create(
            model="gpt-4o-mini", input="x", user=user, metadata={"customer": "acme"}
        )
    assert _quota(api, f"users/{user}")["used"] == "3"

    store.stop()
    with pytest.raises(openai.InternalServerError) as refused:
        meters[0].client().responses.create(model="gpt-4o-mini", input="x", user=user)
    assert refused.value.status_code == 503
    assert refused.value.code == "quota_store_unavailable"
    assert refused.value.response.headers["retry-after"] == "1"
    # A user held to no limit is served as ever: no Redis on its path.
    meters[1].client().responses.create(model="gpt-4o-mini", input="x", user="free")
    # The operator's other choice: served unchecked, and counted once Redis is back.
    lenient.client().responses.create(
        model="gpt-4o-mini", input="x", user=user, metadata={"customer": "acme"}
    )
    wait_for(lambda: meters[0].health().get("quota_store") == "down", 10, "health says down")
    assert meters[0].health()["status"] == "degraded"
    metrics = httpx.get(meters[0].url + "/metrics", timeout=10).text
    assert "tokentill_quota_store_up 0.0" in metrics

    store.start()  # empty: no snapshot, no append-only file
    wait_for(lambda: meters[0].health().get("quota_store") == "up", 10, "health says up")
    wait_for(lambda: lenient.health().get("quota_store") == "up", 10, "the lenient one too")
    # Rebuilt from the lake: the three before, and the one served unchecked.
    wait_for(
        lambda: _lake_count(lake, "user_id = ? AND http_status = 200", [user]) == 4,
        30,
        "the unchecked one in the lake",
    )
    assert _quota(api, f"users/{user}")["used"] == "4"
    assert _quota(api, "tags/customer/acme")["used"] == "4"
    meters[2].client().responses.create(model="gpt-4o-mini", input="x", user=user)
    meters[0].client().responses.create(model="gpt-4o-mini", input="x", user=user)
    with pytest.raises(openai.RateLimitError):
        meters[1].client().responses.create(model="gpt-4o-mini", input="x", user=user)
    assert _quota(api, f"users/{user}")["used"] == "6"

    alerts = httpx.get(f"{api.url}/api/alerts", params={"kind": "quota_store"}, timeout=30)
    assert alerts.status_code == 200, alerts.text
    # One per instance that lost it (each says so once an hour), naming the instance.
    raised = {a["subject"] for a in alerts.json()}
    assert {"instance:proxy-a", "instance:proxy-lenient"} <= raised
    assert len(raised) == len(alerts.json())
