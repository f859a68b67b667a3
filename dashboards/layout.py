"""Small server-rendered HTML: the frame every view shares (navigation, the filter form)
and the pieces views are made of. Everything interpolated is escaped here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from html import escape
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
from fastapi.responses import HTMLResponse

from tokentill.dashboards.filters import ViewFilters

if TYPE_CHECKING:
    from tokentill.api.reports import Measures

ASSETS = "/dashboard/assets"
VIEWS = (
    ("overview", "/dashboard/", "Overview"),
    ("users", "/dashboard/users", "Users"),
    ("models", "/dashboard/models", "Models"),
    ("tags", "/dashboard/tags", "Tags"),
    ("alerts", "/dashboard/alerts", "Quotas & alerts"),
)
# Scripts and styles come from tokentill alone (no CDN, no inline script); plotly.js sets
# inline styles on the elements it draws, hence 'unsafe-inline' for styles only.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def esc(value: object) -> str:
    return escape("" if value is None else str(value))


def document(title: str, body: str, *, status_code: int = 200) -> HTMLResponse:
    html = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · tokentill</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{ASSETS}/dashboard.css">
<script src="{ASSETS}/plotly.min.js" defer></script>
<script src="{ASSETS}/dashboard.js" defer></script>
</head><body>{body}</body></html>"""
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def view(
    title: str,
    active: str,
    filters: ViewFilters,
    content: str,
    *,
    models: Sequence[str] = (),
    extra_fields: str = "",
    status_code: int = 200,
) -> HTMLResponse:
    """A view: navigation carrying the filters, the filter form, then `content`."""
    query = filters.query()
    nav = "".join(
        f'<a href="{href}?{esc(query)}"{" class=active" if key == active else ""}>{name}</a>'
        for key, href, name in VIEWS
    )
    options = "".join(f'<option value="{esc(m)}">' for m in models)
    form = f"""<form class="filters" method="get" id="filters">
<label>From <input type="date" name="from" value="{filters.start}"></label>
<label>To <input type="date" name="to" value="{filters.end}"></label>
<label>Model <input name="model" list="known-models" value="{esc(",".join(filters.models))}"
 placeholder="any"></label>
<label>User <input name="user" value="{esc(",".join(filters.users))}" placeholder="any"></label>
<label>Tag <input name="tag" value="{esc(",".join(filters.tags))}"
 placeholder="key=value"></label>
{extra_fields}<datalist id="known-models">{options}</datalist>
<button type="submit">Apply</button> <a href="?">Reset</a></form>"""
    body = f"""<header><span class="brand">tokentill</span><nav>{nav}</nav>
<a class="docs" href="/api/docs">API</a>
<form method="post" action="/dashboard/logout" class="logout"><button>Log out</button></form>
</header>
<main><h1>{esc(title)}</h1>{form}{content}</main>"""
    return document(title, body, status_code=status_code)


def notice(text: str, kind: str = "note") -> str:
    return f'<p class="notice {kind}">{esc(text)}</p>'


def kpis(items: Iterable[tuple[str, str, str]]) -> str:
    """Tiles of (id, label, value)."""
    tiles = "".join(
        f'<div class="kpi" id="kpi-{esc(key)}"><span>{esc(label)}</span>'
        f"<strong>{esc(value)}</strong></div>"
        for key, label, value in items
    )
    return f'<section class="kpis">{tiles}</section>'


def chart(chart_id: str, title: str, figure: go.Figure | None, empty: str = "") -> str:
    """A chart drawn by dashboard.js from the figure's JSON, or a note saying why not."""
    head = f'<section class="card"><h2>{esc(title)}</h2>'
    if figure is None:
        return f'{head}<p class="notice" id="{esc(chart_id)}-missing">{esc(empty)}</p></section>'
    # JSON in a non-executed script element: "</" must not close it early.
    data = figure.to_json().replace("</", "<\\/")
    return (
        f'{head}<div class="chart" id="{esc(chart_id)}"></div>'
        f'<script type="application/json" data-chart="{esc(chart_id)}">{data}</script></section>'
    )


def table(
    table_id: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], *, raw: bool = False
) -> str:
    """A table; cells are escaped unless `raw` (for cells a view built from escaped parts)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    cell = (lambda v: str(v)) if raw else esc
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return (
        f'<table id="{esc(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def money(usd: str | None, digits: int = 2) -> str:
    """An exact USD string for display: rounded to cents, finer below a cent."""
    if usd is None:
        return "n/a"
    value = Decimal(usd)
    places = digits if value == 0 or abs(value) >= Decimal("0.01") else 6
    return "$" + f"{value.quantize(Decimal(1).scaleb(-places), ROUND_HALF_EVEN):,}"


def spent(measures: Measures) -> str:
    """What was spent, and what is not known: priced money plus the unpriced count."""
    text = money(measures.priced_cost_usd)
    return text + f" + {measures.unpriced:,} unpriced" if measures.unpriced else text


def count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"
