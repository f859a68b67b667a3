"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright,
against a real tokentill filled through the fake upstream with the openai SDK and rolled
up. Every chart's points are read back from plotly.js in the page and compared with the
admin API's answer for the same filters.

Chromium is Debian's `/usr/bin/chromium` (`make test` installs it when missing); Playwright
only drives it, it never downloads a browser. Screenshots go to the test's temp dir, and
also to $TOKENTILL_SCREENSHOTS when set (`make screenshots` refreshes docs/).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import openai
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from starlette.routing import Match

from tests.conftest import Running, serve_tokentill
from tokentill.dashboards.layout import money

TOKEN = "admin-token-for-the-dashboard-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USERS = ("ana", "bo", "cy")
MODELS = ("gpt-4o", "gpt-4o-mini", "tt-unlisted-model")
TEAMS = ("search", "ads")
DAYS_AGO = (0, 1, 3)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Served:
    running: Running
    http: httpx.Client

    @property
    def url(self) -> str:
        return self.running.url

    def api(self, path: str, **params: Any) -> Any:
        answer = self.http.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Iterator[Served]:
    """One tokentill with traffic of 3 users x 3 models (one unpriced) x 2 teams, a
    conversation, an incomplete and an HTTP error, rolled up. The tests only read it."""
    db = tmp_path_factory.mktemp("dashboard") / "w.duckdb"
    with serve_tokentill(db, fake_upstream, admin_token=TOKEN, rollup_interval=3600) as running:
        url = running.url
        client = running.client()
        now = int(time.time())
        for i, (user, model, team) in enumerate(itertools.product(USERS, MODELS, TEAMS)):
            # Today, yesterday and three days ago: the fake answers with that created_at.
            headers = {"x-fake-created-at": str(now - DAYS_AGO[i % 3] * 86400)}
            if i % 7 == 3:
                headers["x-fake-scenario"] = "incomplete"
            client.responses.create(
                model=model,
                input=f"question {i} " * (i + 1),
                user=user,
                metadata={"team": team, "feature": "qa" if i % 2 else "chat"},
                extra_headers=headers,
            )
        previous = None
        for _ in range(3):
            previous = client.responses.create(
                model="gpt-4o", input="go on", user="ana", previous_response_id=previous
            ).id
        with pytest.raises(openai.InternalServerError):
            client.responses.create(
                model="gpt-4o-mini",
                input="boom",
                user="bo",
                extra_headers={"x-fake-scenario": "http_500"},
            )
        running.flush()
        http = httpx.Client(base_url=url, headers=AUTH, timeout=60)
        ran = http.post("/api/jobs/rollup/run", params={"full": "true"})
        assert ran.status_code == 200 and ran.json()["error"] is None
        yield Served(running, http)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@dataclass
class Tab:
    """A browser page that records console errors and uncaught exceptions."""

    page: Page
    errors: list[str]
    shots: Path

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready]", state="attached", timeout=30_000)

    def traces(self, chart_id: str) -> list[dict[str, Any]]:
        """The chart's traces as plotly.js holds them: name, x, y."""
        found: list[dict[str, Any]] = self.page.evaluate(
            """id => document.getElementById(id).data.map(t => ({
                   name: t.name, x: Array.from(t.x), y: Array.from(t.y)}))""",
            chart_id,
        )
        return found

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)

    def screenshot(self, name: str) -> None:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        docs = os.environ.get("TOKENTILL_SCREENSHOTS")
        if docs:
            Path(docs).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(docs) / f"dashboard-{name}.png")


def _tab(context: BrowserContext, shots: Path) -> Tab:
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return Tab(page, errors, shots)


def _log_in(tab: Tab, url: str, target: str = "/dashboard/") -> None:
    tab.page.goto(url + target)
    tab.page.fill("input[name=token]", TOKEN)
    tab.page.click("button[type=submit]")
    tab.page.wait_for_selector("body[data-ready]", state="attached", timeout=30_000)


@pytest.fixture(scope="module")
def logged_in(browser: Browser, served: Served, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The cookies of one login through the login page, reused by the tests' tabs."""
    context = browser.new_context()
    _log_in(_tab(context, tmp_path_factory.mktemp("login")), served.url)
    state = context.storage_state()
    context.close()
    return state


@pytest.fixture
def tab(browser: Browser, logged_in: Any, tmp_path: Path) -> Iterator[Tab]:
    """A logged-in tab in a fresh browser context."""
    context = browser.new_context(viewport={"width": 1400, "height": 900}, storage_state=logged_in)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    yield _tab(context, shots)
    context.close()


def _today() -> date:
    return datetime.now(UTC).date()


def _range() -> dict[str, str]:
    """The dashboard's default range as the admin API's parameters (end exclusive)."""
    today = _today()
    return {"start": str(today - timedelta(days=29)), "end": str(today + timedelta(days=1))}


def _dollars(usd: str) -> float:
    return float(Decimal(usd))


def _by_group_and_day(report: dict[str, Any], dimension: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for row in report["rows"]:
        name = row["group"][dimension] or "(none)"
        out.setdefault(name, {})[row["bucket"][:10]] = _dollars(row["priced_cost_usd"])
    return out


def _chart_by_trace(traces: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {t["name"]: dict(zip(t["x"], t["y"], strict=True)) for t in traces}


def _hbars(traces: list[dict[str, Any]]) -> dict[str, float]:
    (trace,) = traces
    return dict(zip(trace["y"], trace["x"], strict=True))


# -- login -------------------------------------------------------------------------------


def test_login_is_required_and_a_wrong_token_is_refused(
    browser: Browser, served: Served, tmp_path: Path
) -> None:
    context = browser.new_context()
    tab = _tab(context, tmp_path)
    page = tab.page
    page.goto(served.url + "/dashboard/users?model=gpt-4o")
    assert urlsplit(page.url).path == "/dashboard/login"
    assert parse_qs(urlsplit(page.url).query)["next"] == ["/dashboard/users?model=gpt-4o"]
    tab.screenshot("login")
    # Without a session the admin API refuses the browser too.
    assert page.evaluate("fetch('/api/costs').then(r => r.status)") == 401

    page.fill("input[name=token]", "not-the-admin-token-at-all")
    page.click("button[type=submit]")
    page.wait_for_selector("#login-error")
    assert "not the admin token" in page.inner_text("#login-error")
    assert context.cookies() == []
    page.goto(served.url + "/dashboard/users?model=gpt-4o")
    assert urlsplit(page.url).path == "/dashboard/login"

    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("body[data-ready]", state="attached")
    # Back where the browser was going, and the token never in a URL.
    assert urlsplit(page.url).path == "/dashboard/users"
    assert parse_qs(urlsplit(page.url).query) == {"model": ["gpt-4o"]}
    assert TOKEN not in page.url
    (cookie,) = context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert time.time() < cookie["expires"] <= time.time() + served.running.settings.session_lifetime
    assert TOKEN not in cookie["value"]
    # The session works for the admin API and its docs in this browser.
    assert page.evaluate("fetch('/api/costs').then(r => r.status)") == 200
    page.goto(served.url + "/api/docs")
    page.wait_for_selector(".swagger-ui .info", timeout=30_000)
    # A forged or tampered cookie is refused.
    forged = {**cookie, "value": cookie["value"][:-4] + "0000"}
    context.clear_cookies()
    context.add_cookies([forged])  # type: ignore[list-item]
    assert page.evaluate("fetch('/api/costs').then(r => r.status)") == 401

    context.clear_cookies()
    context.add_cookies([cookie])  # type: ignore[list-item]
    page.goto(served.url + "/dashboard/")
    page.click(".logout button")
    page.wait_for_url("**/dashboard/login")
    assert context.cookies() == []
    page.goto(served.url + "/dashboard/models")
    assert urlsplit(page.url).path == "/dashboard/login"
    # Bearer tokens still work as before, and a wrong one is still refused.
    assert httpx.get(served.url + "/api/costs", headers=AUTH).status_code == 200
    wrong = httpx.get(served.url + "/api/costs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    context.close()


def test_login_redirects_only_into_tokentill(served: Served) -> None:
    for target in ("https://elsewhere.example/", "//elsewhere.example/x", "/\\elsewhere"):
        answer = httpx.post(
            served.url + "/dashboard/login",
            data={"token": TOKEN, "next": target},
            follow_redirects=False,
        )
        assert answer.status_code == 303
        assert answer.headers["location"] == "/dashboard/"


# -- every view --------------------------------------------------------------------------


def test_every_view_loads_without_console_errors(tab: Tab, served: Served) -> None:
    views = {
        "overview": "/dashboard/",
        "users": "/dashboard/users",
        "user": "/dashboard/users/ana",
        "models": "/dashboard/models",
        "tags": "/dashboard/tags?key=team",
        "alerts": "/dashboard/alerts",
    }
    for name, path in views.items():
        tab.open(served.url + path)
        charts = tab.page.query_selector_all("div.chart")
        assert all(c.query_selector("svg.main-svg") for c in charts), name
        tab.screenshot(name)
    assert tab.errors == []
    # plotly.js comes from tokentill itself, never a CDN.
    script = httpx.get(served.url + "/dashboard/assets/plotly.min.js")
    assert script.status_code == 200 and len(script.content) > 1_000_000
    page = httpx.get(served.url + "/dashboard/", headers=AUTH).text
    assert "cdn" not in page.lower() and "/dashboard/assets/plotly.min.js" in page


def test_overview_charts_are_the_apis_numbers(tab: Tab, served: Served) -> None:
    tab.open(served.url + "/dashboard/")
    days = _range()
    by_model = served.api("/api/costs", group_by=["model"], bucket="day", **days)
    assert _chart_by_trace(tab.traces("spend-by-model")) == _by_group_and_day(by_model, "model")
    assert len(by_model["rows"]) >= 2

    daily = served.api("/api/costs", bucket="day", **days)
    rows = daily["rows"]
    assert len(rows) == len(DAYS_AGO)
    mix = _chart_by_trace(tab.traces("token-mix"))
    assert mix == {
        "uncached input": {
            r["bucket"][:10]: r["input_tokens"] - r["cached_input_tokens"] for r in rows
        },
        "cached input": {r["bucket"][:10]: r["cached_input_tokens"] for r in rows},
        "output (not reasoning)": {
            r["bucket"][:10]: r["output_tokens"] - r["reasoning_tokens"] for r in rows
        },
        "reasoning": {r["bucket"][:10]: r["reasoning_tokens"] for r in rows},
    }
    requests, rate = tab.traces("requests-errors")
    assert requests["x"] == [r["bucket"][:10] for r in rows]
    assert requests["y"] == [r["requests"] for r in rows]
    assert rate["y"] == [round(100 * r["errors"] / r["requests"], 4) for r in rows]
    assert sum(r["errors"] for r in rows) == 1

    summary = served.api("/api/costs/summary")
    assert tab.text("#kpi-month-to-date strong") == money(summary["month_to_date_usd"])
    assert tab.text("#kpi-today strong") == money(summary["today_usd"])
    totals = daily["totals"]
    assert totals["unpriced"] > 0  # the money shown is the priced part, and says so
    assert tab.text("#kpi-range-cost strong") == (
        f"{money(totals['priced_cost_usd'])} + {totals['unpriced']} unpriced"
    )
    fresh = served.api("/api/jobs/freshness")
    assert fresh["last_rollup_at"] is not None
    assert tab.text("#last-rollup").startswith(fresh["last_rollup_at"][:10])
    assert tab.text("#parts") == f"{fresh['parts_awaiting_compaction']:,}"


def test_users_views_are_the_apis_numbers(tab: Tab, served: Served) -> None:
    tab.open(served.url + "/dashboard/users")
    days = _range()
    listed = served.api("/api/users", **days)
    expected = {u["user_id"]: _dollars(u["priced_cost_usd"]) for u in listed["users"]}
    assert _hbars(tab.traces("top-users")) == expected and set(expected) == set(USERS)
    per_day = _by_group_and_day(
        served.api("/api/costs", group_by=["user"], bucket="day", **days), "user"
    )
    sparks = tab.page.eval_on_selector_all(
        "#users-table tbody tr",
        """rows => rows.map(r => [r.querySelector('a').textContent,
                                  r.querySelector('svg.spark').dataset.values])""",
    )
    day_list = [str(date.fromisoformat(days["start"]) + timedelta(days=i)) for i in range(30)]
    for user, values in sparks:
        assert [float(v) for v in values.split(",")] == [
            per_day[user].get(d, 0.0) for d in day_list
        ]

    tab.page.click("#users-table a >> text=ana")
    tab.page.wait_for_selector("body[data-ready]", state="attached")
    assert urlsplit(tab.page.url).path == "/dashboard/users/ana"
    detail = served.api("/api/users/ana", **days)
    assert _hbars(tab.traces("user-by-model")) == {
        m["model"]: _dollars(m["priced_cost_usd"]) for m in detail["by_model"]
    }
    assert _chart_by_trace(tab.traces("user-by-day")) == {
        "ana": {d["day"][:10]: _dollars(d["priced_cost_usd"]) for d in detail["by_day"]}
    }
    ids = tab.page.eval_on_selector_all(
        "#recent-table tbody tr", "rows => rows.map(r => r.lastElementChild.textContent)"
    )
    assert ids == [e["response_id"] or e["event_id"] for e in detail["recent"]]
    assert tab.page.is_visible("#quotas") and tab.page.is_visible("#alerts")
    assert tab.errors == []


def test_models_view_is_the_apis_numbers_and_names_the_unpriced(tab: Tab, served: Served) -> None:
    tab.open(served.url + "/dashboard/models")
    report = served.api("/api/models", **_range())
    rows = report["models"]
    assert _hbars(tab.traces("model-cost")) == {
        m["model"]: _dollars(m["priced_cost_usd"]) for m in rows
    }
    assert _hbars(tab.traces("model-average-cost")) == {
        m["model"]: _dollars(m["average_cost_per_request_usd"])
        for m in rows
        if m["average_cost_per_request_usd"] is not None
    }
    tokens = {t["name"]: dict(zip(t["y"], t["x"], strict=True)) for t in tab.traces("model-tokens")}
    for m in rows:
        assert tokens["cached input"][m["model"]] == m["cached_input_tokens"]
        assert tokens["reasoning"][m["model"]] == m["reasoning_tokens"]
    shares = _chart_by_trace(tab.traces("model-shares"))
    assert shares["cached input share"] == {
        m["model"]: m["cached_input_share"] or 0.0 for m in rows
    }
    assert report["unpriced_models"] == ["tt-unlisted-model"]
    assert "tt-unlisted-model" in tab.text("#unpriced-models")
    assert tab.errors == []


def test_tags_view_is_the_apis_numbers(tab: Tab, served: Served) -> None:
    tab.open(served.url + "/dashboard/tags?key=team")
    days = _range()
    totals = served.api("/api/costs", group_by=["tag:team"], **days)
    assert totals["source"] == "usage_daily_tags"
    assert _hbars(tab.traces("tag-spend")) == {
        r["group"]["tag:team"]: _dollars(r["priced_cost_usd"]) for r in totals["rows"]
    }
    assert set(_hbars(tab.traces("tag-spend"))) == set(TEAMS)
    by_day = served.api("/api/costs", group_by=["tag:team"], bucket="day", **days)
    assert _chart_by_trace(tab.traces("tag-spend-by-day")) == _by_group_and_day(by_day, "tag:team")
    # Picking another key through the form changes the split.
    tab.page.select_option("select[name=key]", "feature")
    tab.page.click("#filters button[type=submit]")
    tab.page.wait_for_url("**key=feature**")
    tab.page.wait_for_selector("body[data-ready]", state="attached")
    assert set(_hbars(tab.traces("tag-spend"))) == {"qa", "chat"}
    assert tab.errors == []


# -- filters -----------------------------------------------------------------------------


def test_filters_change_the_charts_and_live_in_the_url(tab: Tab, served: Served) -> None:
    days = _range()
    tab.open(served.url + "/dashboard/")
    everything = _chart_by_trace(tab.traces("spend-by-model"))
    model = "gpt-4o-mini-2024-07-18"
    assert model in everything and len(everything) >= 2

    # Model, through the form: the URL carries it, and the chart keeps that model only.
    tab.page.fill("input[name=model]", model)
    tab.page.click("#filters button[type=submit]")
    tab.page.wait_for_url("**model=**")
    tab.page.wait_for_selector("body[data-ready]", state="attached")
    query = parse_qs(urlsplit(tab.page.url).query)
    assert query["model"] == [model] and "user" not in query  # empty fields left out
    assert _chart_by_trace(tab.traces("spend-by-model")) == {model: everything[model]}
    tab.screenshot("overview-filtered")

    # User and tag filters from a shared link, each equal to the API's answer.
    for params, api_params in (
        ("user=bo", {"user": ["bo"]}),
        ("tag=team=ads", {"tag": ["team=ads"]}),
        (f"tag=team=ads&model={model}", {"tag": ["team=ads"], "model": [model]}),
    ):
        tab.open(f"{served.url}/dashboard/?{params}")
        expected = served.api("/api/costs", group_by=["model"], bucket="day", **days, **api_params)
        chart = _chart_by_trace(tab.traces("spend-by-model"))
        assert chart == _by_group_and_day(expected, "model"), params
        assert chart != everything
        # The navigation keeps the filters for the other views.
        href = tab.page.get_attribute("nav a[href^='/dashboard/models']", "href")
        assert (
            href is not None
            and parse_qs(urlsplit(href).query).items()
            >= {k: [",".join(v)] for k, v in api_params.items()}.items()
        )

    tab.open(f"{served.url}/dashboard/users?user=bo,cy")
    assert set(_hbars(tab.traces("top-users"))) == {"bo", "cy"}
    tab.open(f"{served.url}/dashboard/models?user=cy")
    by_cy = served.api("/api/models", user=["cy"], **days)
    assert _hbars(tab.traces("model-cost")) == {
        m["model"]: _dollars(m["priced_cost_usd"]) for m in by_cy["models"]
    }
    # A date range: yesterday alone.
    yesterday = _today() - timedelta(days=1)
    tab.open(f"{served.url}/dashboard/?from={yesterday}&to={yesterday}")
    one_day = served.api(
        "/api/costs",
        group_by=["model"],
        bucket="day",
        start=str(yesterday),
        end=str(yesterday + timedelta(days=1)),
    )
    chart = _chart_by_trace(tab.traces("spend-by-model"))
    assert chart == _by_group_and_day(one_day, "model")
    assert {d for series in chart.values() for d in series} == {str(yesterday)}
    # A range with no traffic empties the charts.
    tab.open(f"{served.url}/dashboard/?from=2020-01-01&to=2020-01-31")
    assert tab.traces("spend-by-model") == []
    assert tab.text("#kpi-range-cost strong") == "$0.00"
    # What the rollups cannot answer is said, not scanned from the raw events.
    tab.open(f"{served.url}/dashboard/?user=bo&tag=team=ads")
    assert "not per user" in tab.text("main")
    assert tab.page.query_selector("#spend-by-model") is None
    tab.open(f"{served.url}/dashboard/?from=yesterday")
    assert "not a date" in tab.text("main")
    assert tab.errors == []


# -- quotas and alerts -------------------------------------------------------------------


def test_quotas_and_alerts_fill_in_from_the_api(tab: Tab, served: Served) -> None:
    tab.open(served.url + "/dashboard/alerts")
    assert tab.text("#quotas [data-source]") == "No quotas set."
    # ana's day limit is below what she spent today (over); bo's far above it.
    for user, limit in (("ana", "0.000001"), ("bo", "1000")):
        answer = served.http.put(
            f"/api/quotas/users/{user}", json={"limit_usd": limit, "period": "day"}
        )
        assert answer.status_code == 200, answer.text
    try:
        tab.open(served.url + "/dashboard/alerts")
        tab.page.wait_for_selector("#quotas-table")
        cells = tab.page.eval_on_selector_all(
            "#quotas-table tbody tr",
            "rows => rows.map(r => [r.cells[0].textContent, r.className])",
        )
        assert cells == [["user:ana", "over"], ["user:bo", ""]]
        listed = {q["user_id"]: q["limits"][0] for q in served.api("/api/quotas")}
        used = tab.page.eval_on_selector_all(
            "#quotas-table tbody tr", "rows => rows.map(r => r.lastElementChild.textContent)"
        )
        assert used[0] == f"{float(listed['ana']['percent_used']):.1f}%"
        tab.screenshot("alerts-filled")
        # A user's page keeps that user's quota only.
        tab.open(served.url + "/dashboard/users/bo")
        tab.page.wait_for_selector("#quotas-table")
        rows = tab.page.eval_on_selector_all("#quotas-table tbody tr", "rows => rows.length")
        assert rows == 1 and "user:bo" in tab.text("#quotas-table")
    finally:
        for user in ("ana", "bo"):
            served.http.delete(f"/api/quotas/users/{user}")
    assert tab.errors == []


def test_quotas_and_alerts_say_not_configured_without_their_routes(
    tab: Tab, served: Served
) -> None:
    """A tokentill without GET /api/quotas and /api/alerts (as before the quotas work)
    says so, and fetches nothing."""
    api = served.running.app.api
    before = list(api.router.routes)

    def serves(path: str, route: Any) -> bool:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "path_params": {}}
        return bool(route.matches(scope)[0] == Match.FULL)

    api.router.routes[:] = [
        r for r in before if not (serves("/api/quotas", r) or serves("/api/alerts", r))
    ]
    try:
        tab.open(served.url + "/dashboard/alerts")
        assert "not configured yet" in tab.text("#quotas-not-configured")
        assert "not configured yet" in tab.text("#alerts-not-configured")
        assert tab.page.query_selector("[data-source]") is None
        tab.screenshot("alerts")
    finally:
        api.router.routes[:] = before
    assert tab.errors == []


def test_without_a_token_loopback_needs_no_login(make_tokentill: Any) -> None:
    running = make_tokentill(rollup_interval=3600)
    running.client().responses.create(model="gpt-4o", input="hi", user="team/a b")
    running.flush()
    assert httpx.post(running.url + "/api/jobs/rollup/run", timeout=60).status_code == 200
    home = httpx.get(running.url + "/", follow_redirects=True)
    assert home.status_code == 200 and str(home.url).endswith("/dashboard/")
    assert 'id="spend-by-model"' in home.text
    login = httpx.get(running.url + "/dashboard/login", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/dashboard/"
    users = httpx.get(running.url + "/dashboard/users")
    assert "/dashboard/users/team%2Fa%20b?" in users.text
    # An end user id with a slash has a page of its own.
    page = httpx.get(running.url + "/dashboard/users/team%2Fa%20b")
    assert page.status_code == 200 and 'id="user-by-model"' in page.text


def _drawn_bar_widths(page: Page, chart_id: str) -> list[float]:
    """The width, in screen pixels, of every bar plotly.js drew in the chart."""
    widths: list[float] = page.evaluate(
        """id => Array.from(document.querySelectorAll(`#${id} .barlayer .point path`))
               .map(p => p.getBoundingClientRect().width)""",
        chart_id,
    )
    return widths


@pytest.mark.parametrize("days", [1, 7, 90])
def test_day_charts_draw_visible_bars_for_one_day_a_week_and_ninety_days(
    browser: Browser, make_tokentill: Any, tmp_path: Path, days: int
) -> None:
    """What a person sees, not only the figure's data: every day with traffic is a bar
    wide enough to see, on the first day of an install too."""
    running: Running = make_tokentill(rollup_interval=3600)
    client = running.client()
    now = int(time.time())
    for ago in range(days):
        client.responses.create(
            model="gpt-4o-mini",
            input="hello",
            user="first-day" if ago == 0 else "old-hand",
            extra_headers={"x-fake-created-at": str(now - ago * 86400)},
        )
    running.flush()
    assert httpx.post(running.url + "/api/jobs/rollup/run", timeout=120).status_code == 200
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        tab = _tab(context, tmp_path)
        today = _today()
        start = today - timedelta(days=days - 1)
        tab.open(f"{running.url}/dashboard/?from={start}&to={today}")
        for chart_id in ("spend-by-model", "token-mix", "requests-errors"):
            widths = _drawn_bar_widths(tab.page, chart_id)
            visible = [w for w in widths if w >= 2]
            assert len(visible) >= days, (chart_id, widths)
        tab.open(f"{running.url}/dashboard/users/first-day?from={start}&to={today}")
        assert [w for w in _drawn_bar_widths(tab.page, "user-by-day") if w >= 2], "user page"
        assert tab.errors == []
    finally:
        context.close()
