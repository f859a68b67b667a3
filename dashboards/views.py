"""The dashboard's views, server-rendered from the admin API's own route functions
(api/reports.py, api/jobs.py), so every number on a page is the API's number for the same
filters.

Pages stay fast on a big warehouse because every chart is answered by a rollup: before a
chart is asked for, `_costs` checks which table would answer it (`choose_source`) and
shows why not instead of scanning raw events. The only raw read is the user page's
bounded list of recent responses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Literal, TypeVar, cast
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Match

from tokentill.api import events, jobs, reports
from tokentill.api.deps import RuntimeDep
from tokentill.api.params import FilterParams
from tokentill.api.params import filters as api_filters
from tokentill.api.reports import in_thread
from tokentill.dashboards import figures
from tokentill.dashboards.filters import FilterError, ViewFilters
from tokentill.dashboards.layout import chart, count, esc, kpis, money, notice, spent, table, view
from tokentill.dashboards.login import ViewerDep
from tokentill.warehouse.spend import SpendQuery, choose_source, recent_models

if TYPE_CHECKING:
    from tokentill.api.runtime import AdminRuntime

router = APIRouter(prefix="/dashboard", include_in_schema=False, dependencies=[ViewerDep])
root = APIRouter(include_in_schema=False)
T = TypeVar("T")
TOP_USERS = 25


@root.get("/")
async def home() -> Response:
    return RedirectResponse("/dashboard/", 307)


class NotFromRollups(Exception):
    """A chart the rollups cannot answer with these filters: the page says why."""


class Refused(Exception):
    """The API refused the question (its 4xx detail is shown)."""


def _filters(request: Request) -> tuple[ViewFilters, str]:
    today = datetime.now(UTC).date()
    try:
        return ViewFilters.parse(request.query_params, today), ""
    except FilterError as exc:
        return ViewFilters.default(today), notice(f"{exc}. Showing the default range.", "error")


async def _api(call: Awaitable[T]) -> T:
    try:
        return await call
    except HTTPException as exc:
        if exc.status_code >= 500:
            raise
        raise Refused(str(exc.detail)) from exc


def _why_raw(f: ViewFilters, group_by: list[str]) -> str:
    keys = f.tag_keys | {d[4:] for d in group_by if d.startswith("tag:")}
    if keys and (f.users or "user" in group_by):
        return (
            "Tags are rolled up per day and model, not per user: clear the user filter "
            "or the tag filter to see this chart."
        )
    if len(keys) > 1:
        return "Tags are rolled up one metadata key at a time: filter on one key only."
    return "These filters need the raw events, which pages never scan: narrow them."


async def _costs(
    runtime: AdminRuntime,
    f: ViewFilters,
    group_by: list[str],
    bucket: Literal["day", "month"] | None,
) -> reports.CostReport:
    params = reports.CostParams(**f.api_params(), group_by=group_by, bucket=bucket, limit=10_000)
    query = SpendQuery(api_filters(params), tuple(group_by), bucket)
    if choose_source(query) == "raw":
        raise NotFromRollups(_why_raw(f, group_by))
    # What GET /api/costs answers, before it is serialized: a chart holds exactly that.
    report = reports.CostReport.model_validate(await _api(reports.cost_report(runtime, params)))
    if report.truncated:
        # A chart missing points would be wrong, not just incomplete: say so instead.
        raise Refused(
            f"More than {params.limit:,} points to draw: pick a shorter range or filter "
            "on fewer models or users."
        )
    return report


async def _known_models(runtime: AdminRuntime) -> list[str]:
    return await in_thread(runtime, recent_models)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "never"


def _days(f: ViewFilters) -> list[date]:
    return [f.start + timedelta(days=i) for i in range((f.end - f.start).days + 1)]


# -- overview ----------------------------------------------------------------------------


@router.get("/")
async def overview(request: Request, runtime: RuntimeDep) -> HTMLResponse:
    f, error = _filters(request)
    # Independent reads, each on its own cursor in a thread: run them together.
    summary, fresh, known, charted = await asyncio.gather(
        reports.summary(runtime),
        jobs.freshness(runtime),
        _known_models(runtime),
        asyncio.gather(
            _costs(runtime, f, ["model"], "day"),
            _costs(runtime, f, [], "day"),
            return_exceptions=True,
        ),
    )
    parts = [
        error,
        kpis(
            [
                ("today", "Today", money(summary.today_usd)),
                ("month-to-date", "Month to date", money(summary.month_to_date_usd)),
                ("projected", "Projected month end", money(summary.projected_month_end_usd)),
                ("last-month", "Last month", money(summary.last_month_usd)),
            ]
        ),
        '<p class="hint">These four are the whole account (no filters), UTC days.</p>',
    ]
    failed = next((c for c in charted if isinstance(c, BaseException)), None)
    if isinstance(failed, NotFromRollups | Refused):
        parts.append(notice(str(failed)))
    elif failed is not None:
        raise failed
    else:
        by_model, daily = cast(list[reports.CostReport], charted)
        totals = daily.totals
        parts.append(
            kpis(
                [
                    ("range-cost", "Spend in range", spent(totals)),
                    ("range-requests", "Requests in range", count(totals.requests)),
                    ("range-tokens", "Tokens in range", count(totals.total_tokens)),
                    ("range-unpriced", "Unpriced responses", count(totals.unpriced)),
                ]
            )
        )
        parts.append('<div class="grid">')
        parts.append(
            chart(
                "spend-by-model",
                "Spend per day, by model",
                figures.spend_by_group_over_days(by_model, "model", f.span),
            )
        )
        parts.append(
            chart("token-mix", "Token mix per day", figures.token_mix_over_days(daily, f.span))
        )
        parts.append(
            chart(
                "requests-errors",
                "Requests and error rate per day",
                figures.requests_and_errors(daily, f.span),
            )
        )
        parts.append("</div>")
        if totals.unpriced:
            parts.append(
                notice(
                    f"{totals.unpriced:,} responses had no price in force and are not in the "
                    "spend: see Models.",
                    "warn",
                )
            )
    parts.append(
        f"""<section class="card freshness" id="freshness"><h2>Data freshness</h2>
<dl><dt>Last event</dt><dd id="last-event">{esc(_when(fresh.last_event_at))}</dd>
<dt>Last rollup</dt><dd id="last-rollup">{esc(_when(fresh.last_rollup_at))}</dd>
<dt>Events not rolled up yet</dt><dd>{fresh.events_not_rolled_up:,}</dd>
<dt>Parts awaiting compaction</dt><dd id="parts">{fresh.parts_awaiting_compaction:,}</dd>
<dt>Journal backlog</dt><dd>{fresh.journal_backlog:,}</dd></dl>
{
            notice("The last rollup failed: " + fresh.last_rollup_error, "error")
            if fresh.last_rollup_error
            else ""
        }{_sinks_table(fresh.billing_sinks)}</section>"""
    )
    return view("Overview", "overview", f, "".join(parts), models=known)


def _sinks_table(sinks: list[jobs.SinkFreshness]) -> str:
    """Each billing sink: how far behind the warehouse it is, and why, if it is."""
    if not sinks:
        return ""
    rows = "".join(
        f"""<tr data-sink="{esc(s.name)}"><td>{esc(s.name)}</td><td class="num">{s.delivered:,}</td>
<td class="num">{s.events_behind:,}</td><td class="num lag">{s.lag_seconds:,.0f} s</td>
<td class="num">{s.rejected:,}</td><td>{esc(s.last_error or "")}</td></tr>"""
        for s in sinks
    )
    return f"""<h3>Billing sinks</h3><table class="sinks"><thead><tr><th>Sink</th>
<th>Delivered</th><th>Events behind</th><th>Lag</th><th>Rejected</th><th>Last error</th></tr>
</thead><tbody>{rows}</tbody></table>"""


# -- users -------------------------------------------------------------------------------


def _sparkline(values: list[float]) -> str:
    """A tiny inline SVG line; its points are in data-values for anyone checking."""
    width, height = 120, 24
    top = max(values) if values and max(values) > 0 else 1.0
    step = width / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values)
    )
    data = ",".join(repr(v) for v in values)
    return (
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'data-values="{data}" role="img" aria-label="spend per day">'
        f'<polyline points="{points}" fill="none" stroke="currentColor" stroke-width="1.5"/></svg>'
    )


def _user_link(user_id: str | None, f: ViewFilters) -> str:
    if user_id is None:
        return "<em>(no end user)</em>"
    return (
        f'<a href="/dashboard/users/{quote(user_id, safe="")}?{esc(f.query())}">{esc(user_id)}</a>'
    )


@router.get("/users")
async def users(
    request: Request,
    runtime: RuntimeDep,
    sort: Literal["cost", "tokens", "requests", "last_seen"] = "cost",
) -> HTMLResponse:
    f, error = _filters(request)
    options = "".join(
        f'<option value="{s}"{" selected" if s == sort else ""}>{s.replace("_", " ")}</option>'
        for s in ("cost", "tokens", "requests", "last_seen")
    )
    sort_field = f'<label>Sort by <select name="sort">{options}</select></label>'
    parts = [error]
    if f.tags:
        parts.append(
            notice(
                "Spend per user is rolled up without tags, so the users list cannot be "
                "filtered by tag: clear the tag filter (the Tags view splits spend by tag)."
            )
        )
        return view("Users", "users", f, "".join(parts), extra_fields=sort_field)
    params = {k: v for k, v in f.api_params().items() if k != "tag"}
    try:
        page = await _api(
            reports.users(runtime, reports.UserParams(**params, sort=sort, limit=TOP_USERS))
        )
        named = tuple(u.user_id for u in page.users if u.user_id is not None)
        daily = await _costs(runtime, replace(f, users=named), ["user"], "day") if named else None
    except (NotFromRollups, Refused) as exc:
        parts.append(notice(str(exc)))
        return view("Users", "users", f, "".join(parts), extra_fields=sort_field)
    series: dict[str, dict[str, float]] = {}
    for row in daily.rows if daily else []:
        user = row.group["user"]
        if user is not None:
            series.setdefault(user, {})[figures.day(row.bucket)] = figures.dollars(
                row.priced_cost_usd
            )
    days = [d.isoformat() for d in _days(f)]
    labels = [u.user_id if u.user_id is not None else "(no end user)" for u in page.users]
    parts.append(
        f'<p class="hint">{page.total_users:,} end users in range; the top {len(page.users)} '
        f"by {sort.replace('_', ' ')}.</p>"
    )
    parts.append(
        chart(
            "top-users",
            "Top spenders",
            figures.bars(
                labels, [figures.dollars(u.priced_cost_usd) for u in page.users], "USD", money=True
            )
            if page.users
            else None,
            "No usage in this range.",
        )
    )
    rows = [
        (
            _user_link(u.user_id, f),
            esc(spent(u)),
            esc(count(u.requests)),
            esc(count(u.total_tokens)),
            esc(count(u.unpriced)),
            esc(_when(u.last_seen)),
            _sparkline([series.get(u.user_id or "", {}).get(d, 0.0) for d in days]),
        )
        for u in page.users
    ]
    parts.append(
        '<section class="card"><h2>End users</h2>'
        + table(
            "users-table",
            ["User", "Spend", "Requests", "Tokens", "Unpriced", "Last seen (hour)", "Per day"],
            rows,
            raw=True,
        )
        + "</section>"
    )
    return view(
        "Users",
        "users",
        f,
        "".join(parts),
        models=await _known_models(runtime),
        extra_fields=sort_field,
    )


def _has_get_route(request: Request, path: str) -> bool:
    """Whether the app answers GET `path` (asked the way the router itself matches, since
    included routers need not list their routes as plain `Route`s)."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "path_params": {}}
    return any(route.matches(scope)[0] == Match.FULL for route in request.app.routes)


def _quota_sections(
    request: Request, user_id: str | None = None, users: tuple[str, ...] = ()
) -> str:
    """Quotas and abuse flags, fetched by dashboard.js from GET /api/quotas and
    GET /api/alerts once tokentill serves them; until then, a plain 'not configured'."""
    # The script keeps only these users' rows (the page's user, or the user filter).
    wanted = (user_id,) if user_id is not None else users
    scope = f' data-users="{esc(",".join(wanted))}"' if wanted else ""
    out = []
    for key, path, title, missing in (
        (
            "quotas",
            "/api/quotas",
            "Quotas"
            if user_id is not None
            else "Quotas, fullest first (near: 80% used, over: 100%)",
            "Quotas are not configured yet: this fills in once tokentill serves GET /api/quotas.",
        ),
        (
            "alerts",
            "/api/alerts",
            "Abuse flags",
            "Abuse monitoring is not configured yet: this fills in once tokentill serves "
            "GET /api/alerts.",
        ),
    ):
        if _has_get_route(request, path):
            body = f'<div data-source="{path}" data-kind="{key}"{scope}>Loading…</div>'
        else:
            body = f'<p class="notice" id="{key}-not-configured">{esc(missing)}</p>'
        out.append(f'<section class="card" id="{key}"><h2>{esc(title)}</h2>{body}</section>')
    return "".join(out)


@router.get("/users/{user_id:path}")
async def user_page(
    request: Request,
    runtime: RuntimeDep,
    user_id: str = Path(min_length=1, max_length=256),
) -> HTMLResponse:
    f, error = _filters(request)
    title = f"User {user_id}"
    parts = [error]
    if f.tags:
        parts.append(
            notice(
                "Spend per user is rolled up without tags: clear the tag filter to see "
                "this user's spend."
            )
        )
        return view(title, "users", f, "".join(parts))
    params = {k: v for k, v in f.api_params().items() if k != "tag"}
    try:
        detail = await _api(reports.user_detail(runtime, user_id, FilterParams(**params)))
    except Refused as exc:
        parts.append(notice(str(exc)))
        parts.append(_quota_sections(request, user_id))
        return view(title, "users", f, "".join(parts))
    t = detail.totals
    parts.append(
        kpis(
            [
                ("user-cost", "Spend in range", spent(t)),
                ("user-requests", "Requests", count(t.requests)),
                ("user-tokens", "Tokens", count(t.total_tokens)),
                ("user-unpriced", "Unpriced responses", count(t.unpriced)),
            ]
        )
    )
    parts.append('<div class="grid">')
    parts.append(
        chart(
            "user-by-model",
            "Spend by model",
            figures.bars(
                [m.model or "(none)" for m in detail.by_model],
                [figures.dollars(m.priced_cost_usd) for m in detail.by_model],
                "USD",
                money=True,
            ),
        )
    )
    by_day = reports.CostReport(
        start=detail.start,
        end=detail.end,
        group_by=["user"],
        bucket="day",
        source="usage_daily",
        rows=[
            reports.CostRow(bucket=d.day, group={"user": user_id}, **d.model_dump(exclude={"day"}))
            for d in detail.by_day
        ],
        truncated=False,
        totals=detail.totals,
    )
    parts.append(
        chart(
            "user-by-day", "Spend per day", figures.spend_by_group_over_days(by_day, "user", f.span)
        )
    )
    parts.append("</div>")
    parts.append(_quota_sections(request, user_id))
    recent = [
        (
            _when(e.created_at),
            e.model or "",
            e.status,
            e.endpoint,
            count(e.input_tokens),
            count(e.output_tokens),
            money(e.cost_usd, 6) if e.cost_usd is not None else "unpriced",
            e.response_id or e.event_id,
        )
        for e in detail.recent
    ]
    parts.append(
        '<section class="card"><h2>Recent responses</h2>'
        + table(
            "recent-table",
            ["Created", "Model", "Status", "Endpoint", "Input", "Output", "Cost", "Id"],
            recent,
        )
        + "</section>"
    )
    parts.append(await _conversations_section(runtime, user_id, f))
    return view(title, "users", f, "".join(parts), models=await _known_models(runtime))


async def _conversations_section(runtime: RuntimeDep, user_id: str, f: ViewFilters) -> str:
    """The user's costliest conversations (previous_response_id chains) in the range."""
    range_ = f.api_params()
    page = await _api(
        events.conversations(
            runtime,
            events.ConversationParams(
                start=range_["start"], end=range_["end"], user=user_id, limit=10
            ),
        )
    )
    rows = [
        (
            f'<a href="/dashboard/conversations/{quote(c.root_id, safe="")}?{esc(f.query())}">'
            f"{esc(c.root_id)}</a>",
            esc(count(c.responses)),
            esc(count(c.total_tokens)),
            esc(money(c.cost_usd, 6) if c.cost_usd is not None else "unpriced"),
            esc(_when(c.last_at)),
        )
        for c in page.conversations
    ]
    if not rows:
        return ""
    return (
        '<section class="card"><h2>Conversations, costliest first</h2>'
        + table(
            "conversations-table",
            ["First response", "Responses", "Tokens", "Cost", "Last"],
            rows,
            raw=True,
        )
        + "</section>"
    )


@router.get("/conversations/{root_id}")
async def conversation_page(
    request: Request, runtime: RuntimeDep, root_id: str = Path(min_length=1, max_length=256)
) -> HTMLResponse:
    """One conversation: what it had cost after each turn (each turn reads the whole
    conversation again, so a long chain costs more per turn)."""
    f, error = _filters(request)
    title = f"Conversation {root_id}"
    try:
        detail = await _api(events.conversation(runtime, root_id))
    except Refused as exc:
        return view(title, "users", f, error + notice(str(exc)))
    turns = detail.turns
    parts = [
        error,
        kpis(
            [
                ("conversation-user", "End user", detail.user_id or "(none)"),
                ("conversation-responses", "Responses", count(detail.responses)),
                ("conversation-cost", "Cost", money(detail.cost_usd, 6)),
            ]
        ),
        chart(
            "conversation-growth",
            "Cost as the conversation grew",
            figures.conversation_growth(turns) if turns else None,
            "No responses of this conversation are in the warehouse.",
        ),
        '<section class="card"><h2>Turns</h2>'
        + table(
            "turns-table",
            ["#", "Created", "Model", "Tokens", "Cost", "So far"],
            [
                (
                    i + 1,
                    _when(t.created_at),
                    t.model or "",
                    count(t.total_tokens),
                    money(t.cost_usd, 6) if t.cost_usd is not None else "unpriced",
                    money(t.cumulative_cost_usd, 6),
                )
                for i, t in enumerate(turns)
            ],
        )
        + "</section>",
    ]
    return view(title, "users", f, "".join(parts))


# -- models ------------------------------------------------------------------------------


@router.get("/models")
async def models(request: Request, runtime: RuntimeDep) -> HTMLResponse:
    f, error = _filters(request)
    parts = [error]
    if f.tags:
        parts.append(
            notice(
                "Cached and reasoning tokens are not rolled up per tag: clear the tag filter "
                "for the models view (the Tags view shows spend per tag and model)."
            )
        )
        return view("Models", "models", f, "".join(parts))
    try:
        report = await _api(reports.models(runtime, FilterParams(**f.api_params())))
    except Refused as exc:
        parts.append(notice(str(exc)))
        return view("Models", "models", f, "".join(parts))
    rows = report.models
    if report.unpriced_models:
        unpriced = sum(m.unpriced for m in rows)
        parts.append(
            f'<p class="notice warn" id="unpriced-models">No price in force for '
            f"<strong>{esc(', '.join(report.unpriced_models))}</strong>: their {unpriced:,} "
            "responses are counted but not in the spend. Add their prices (README, "
            "Money) and the next rollup prices them.</p>"
        )
    names = [m.model or "(none)" for m in rows]
    priced = [m for m in rows if m.average_cost_per_request_usd is not None]
    parts.append('<div class="grid">')
    parts.append(
        chart(
            "model-cost",
            "Spend per model",
            figures.bars(
                names, [figures.dollars(m.priced_cost_usd) for m in rows], "USD", money=True
            )
            if rows
            else None,
            "No usage in this range.",
        )
    )
    parts.append(
        chart(
            "model-tokens",
            "Tokens per model",
            figures.tokens_by_model(rows) if rows else None,
            "No usage in this range.",
        )
    )
    parts.append(
        chart(
            "model-average-cost",
            "Average cost per priced request",
            figures.bars(
                [m.model or "(none)" for m in priced],
                [figures.dollars(m.average_cost_per_request_usd or "0") for m in priced],
                "USD",
                money=True,
            )
            if priced
            else None,
            "No priced requests in this range.",
        )
    )
    parts.append(
        chart(
            "model-shares",
            "Cached-input and reasoning shares",
            figures.shares_by_model(rows) if rows else None,
            "No usage in this range.",
        )
    )
    parts.append("</div>")
    parts.append(
        '<section class="card"><h2>Per model</h2>'
        + table(
            "models-table",
            [
                "Model",
                "Spend",
                "Requests",
                "Avg / request",
                "Input",
                "Cached share",
                "Output",
                "Reasoning share",
                "Unpriced",
            ],
            [
                (
                    m.model or "(none)",
                    spent(m),
                    count(m.requests),
                    money(m.average_cost_per_request_usd, 6),
                    count(m.input_tokens),
                    _percent(m.cached_input_share),
                    count(m.output_tokens),
                    _percent(m.reasoning_share),
                    count(m.unpriced),
                )
                for m in rows
            ],
        )
        + "</section>"
    )
    return view("Models", "models", f, "".join(parts), models=await _known_models(runtime))


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.1%}"


# -- tags --------------------------------------------------------------------------------


@router.get("/tags")
async def tags(request: Request, runtime: RuntimeDep, key: str | None = None) -> HTMLResponse:
    f, error = _filters(request)
    keys = runtime.settings.rollup_tag_keys
    chosen = key or (keys[0] if keys else "")
    options = "".join(
        f'<option value="{esc(k)}"{" selected" if k == chosen else ""}>{esc(k)}</option>'
        for k in keys
    )
    picker = f'<label>Split by <select name="key">{options}</select></label>'
    parts = [error]
    if chosen not in keys:
        parts.append(
            notice(
                f"{chosen!r} is not a rolled-up metadata key. Rolled up: {', '.join(keys)} "
                "(TOKENTILL_ROLLUP_TAG_KEYS)."
            )
        )
        return view("Tags", "tags", f, "".join(parts), extra_fields=picker)
    dimension = f"tag:{chosen}"
    try:
        totals = await _costs(runtime, f, [dimension], None)
        by_day = await _costs(runtime, f, [dimension], "day")
    except (NotFromRollups, Refused) as exc:
        parts.append(notice(str(exc)))
        return view("Tags", "tags", f, "".join(parts), extra_fields=picker)
    values = [r.group[dimension] for r in totals.rows]
    labels = [v if v is not None else "(none)" for v in values]
    parts.append('<div class="grid">')
    parts.append(
        chart(
            "tag-spend",
            f"Spend by {chosen}",
            figures.bars(
                labels, [figures.dollars(r.priced_cost_usd) for r in totals.rows], "USD", money=True
            )
            if totals.rows
            else None,
            f"No responses carry the metadata key {chosen!r} in this range.",
        )
    )
    parts.append(
        chart(
            "tag-spend-by-day",
            f"Spend per day by {chosen}",
            figures.spend_by_group_over_days(by_day, dimension, f.span) if by_day.rows else None,
            f"No responses carry the metadata key {chosen!r} in this range.",
        )
    )
    parts.append("</div>")

    def link(value: str | None) -> str:
        if value is None:
            return "(none)"
        narrowed = f.query(tags=(*f.tags, f"{chosen}={value}"))
        return f'<a href="/dashboard/?{esc(narrowed)}">{esc(value)}</a>'

    parts.append(
        '<section class="card"><h2>Per value</h2>'
        + table(
            "tags-table",
            [chosen, "Spend", "Requests", "Tokens", "Unpriced"],
            [
                (
                    link(r.group[dimension]),
                    esc(spent(r)),
                    esc(count(r.requests)),
                    esc(count(r.total_tokens)),
                    esc(count(r.unpriced)),
                )
                for r in totals.rows
            ],
            raw=True,
        )
        + "</section>"
    )
    return view(
        "Tags", "tags", f, "".join(parts), models=await _known_models(runtime), extra_fields=picker
    )


# -- quotas and alerts -------------------------------------------------------------------


@router.get("/alerts")
async def alerts(request: Request) -> HTMLResponse:
    f, error = _filters(request)
    return view("Quotas & alerts", "alerts", f, error + _quota_sections(request, users=f.users))
