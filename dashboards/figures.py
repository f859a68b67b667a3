"""Plotly figures from the admin API's own answers (api/reports.py models), so a chart's
points are the API's numbers: money as `float(Decimal(priced_cost_usd))` (dollars), tokens and
counts as given. Pure: no I/O, nothing but the rows in and a figure out."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal

import plotly.graph_objects as go

from tokentill.api.events import Turn
from tokentill.api.reports import CostReport, Measures, ModelRow

_LAYOUT = {
    "template": "plotly_white",
    "height": 340,
    "margin": {"l": 60, "r": 20, "t": 10, "b": 40},
    "legend": {"orientation": "h", "y": -0.18},
    "hovermode": "x unified",
}


def dollars(usd: str) -> float:
    return float(Decimal(usd))


def day(moment: datetime | None) -> str:
    return moment.date().isoformat() if moment else ""


Span = tuple[date, date]  # the view's first and last day, both shown


# A day's bar is 80% of a day wide. On a date axis Plotly otherwise guesses a bar's width
# from the gaps between the x values, and with one day of data (a first day, a new user)
# there is none: the bar is drawn 0 px wide.
DAY_BAR_MS = int(0.8 * 86_400_000)


def _day_bar(**trace: object) -> go.Bar:
    return go.Bar(width=DAY_BAR_MS, **trace)


def _day_axis(span: Span) -> dict[str, object]:
    """The whole range on the x axis, a day per bar, even where no day has data."""
    first = datetime(span[0].year, span[0].month, span[0].day) - timedelta(hours=12)
    last = datetime(span[1].year, span[1].month, span[1].day) + timedelta(hours=12)
    return {"type": "date", "range": [first.isoformat(), last.isoformat()], "tickformat": "%b %d"}


def _figure(traces: Sequence[go.BaseTraceType], **layout: object) -> go.Figure:
    return go.Figure(list(traces), layout={**_LAYOUT, **layout})


def spend_by_group_over_days(report: CostReport, dimension: str, span: Span) -> go.Figure:
    """Stacked bars: one trace per value of `dimension` (highest total spend first)."""
    series: dict[str, tuple[list[str], list[float]]] = {}
    totals: dict[str, Decimal] = {}
    for row in report.rows:
        name = str(row.group[dimension]) if row.group[dimension] is not None else "(none)"
        xs, ys = series.setdefault(name, ([], []))
        xs.append(day(row.bucket))
        ys.append(dollars(row.priced_cost_usd))
        totals[name] = totals.get(name, Decimal(0)) + Decimal(row.priced_cost_usd)
    order = sorted(series, key=lambda n: (-totals[n], n))
    traces = [_day_bar(name=n, x=series[n][0], y=series[n][1]) for n in order]
    return _figure(
        traces, barmode="stack", xaxis=_day_axis(span), yaxis={"title": "USD", "tickprefix": "$"}
    )


def token_mix_over_days(report: CostReport, span: Span) -> go.Figure:
    """Stacked bars per day: uncached input, cached input, output less reasoning,
    reasoning. Without cached/reasoning counts (tag rollups keep none): input, output."""
    days = [day(r.bucket) for r in report.rows]
    rows = report.rows
    detailed = all(r.cached_input_tokens is not None for r in rows) and all(
        r.reasoning_tokens is not None for r in rows
    )
    if detailed:
        parts = {
            "uncached input": [(r.input_tokens or 0) - (r.cached_input_tokens or 0) for r in rows],
            "cached input": [r.cached_input_tokens or 0 for r in rows],
            "output (not reasoning)": [
                (r.output_tokens or 0) - (r.reasoning_tokens or 0) for r in rows
            ],
            "reasoning": [r.reasoning_tokens or 0 for r in rows],
        }
    else:
        parts = {
            "input": [r.input_tokens or 0 for r in rows],
            "output": [r.output_tokens or 0 for r in rows],
        }
    traces = [_day_bar(name=name, x=days, y=ys) for name, ys in parts.items()]
    return _figure(traces, barmode="stack", xaxis=_day_axis(span), yaxis={"title": "tokens"})


def requests_and_errors(report: CostReport, span: Span) -> go.Figure:
    """Requests per day, and the error rate (HTTP errors / requests) on a second axis."""
    days = [day(r.bucket) for r in report.rows]
    traces: list[go.BaseTraceType] = [
        _day_bar(name="requests", x=days, y=[r.requests for r in report.rows])
    ]
    if all(r.errors is not None for r in report.rows):
        rates = [
            round(100 * (r.errors or 0) / r.requests, 4) if r.requests else 0.0 for r in report.rows
        ]
        traces.append(
            go.Scatter(name="error rate %", x=days, y=rates, yaxis="y2", mode="lines+markers")
        )
    return _figure(
        traces,
        xaxis=_day_axis(span),
        yaxis={"title": "requests"},
        yaxis2={"title": "error rate %", "overlaying": "y", "side": "right", "rangemode": "tozero"},
    )


def bars(
    labels: Sequence[str], values: Sequence[float], name: str, *, money: bool = False
) -> go.Figure:
    """One horizontal bar per label, the first label on top."""
    trace = go.Bar(name=name, x=list(values), y=list(labels), orientation="h")
    axis = {"title": name, **({"tickprefix": "$"} if money else {})}
    height = max(160, 40 + 26 * len(labels))
    return _figure(
        [trace],
        xaxis=axis,
        yaxis={"autorange": "reversed", "automargin": True},
        height=height,
        hovermode="closest",
    )


def tokens_by_model(models: Sequence[ModelRow]) -> go.Figure:
    names = [m.model or "(none)" for m in models]
    parts = {
        "uncached input": [(m.input_tokens or 0) - (m.cached_input_tokens or 0) for m in models],
        "cached input": [m.cached_input_tokens or 0 for m in models],
        "output (not reasoning)": [
            (m.output_tokens or 0) - (m.reasoning_tokens or 0) for m in models
        ],
        "reasoning": [m.reasoning_tokens or 0 for m in models],
    }
    traces = [go.Bar(name=n, x=ys, y=names, orientation="h") for n, ys in parts.items()]
    return _figure(
        traces,
        barmode="stack",
        yaxis={"autorange": "reversed", "automargin": True},
        height=max(200, 60 + 30 * len(names)),
        hovermode="closest",
    )


def shares_by_model(models: Sequence[ModelRow]) -> go.Figure:
    names = [m.model or "(none)" for m in models]
    traces = [
        go.Bar(name="cached input share", x=names, y=[m.cached_input_share or 0.0 for m in models]),
        go.Bar(name="reasoning share", x=names, y=[m.reasoning_share or 0.0 for m in models]),
    ]
    return _figure(traces, barmode="group", yaxis={"tickformat": ".0%"}, hovermode="closest")


def measures_total(rows: Sequence[Measures]) -> Decimal:
    return sum((Decimal(r.priced_cost_usd) for r in rows), Decimal(0))


def conversation_growth(turns: Sequence[Turn]) -> go.Figure:
    """Each turn's cost (bars) and what the chain had cost so far (a line), by turn."""
    numbers = list(range(1, len(turns) + 1))
    traces: list[go.BaseTraceType] = [
        go.Bar(name="turn", x=numbers, y=[dollars(t.cost_usd or "0") for t in turns]),
        go.Scatter(
            name="so far",
            x=numbers,
            y=[dollars(t.cumulative_cost_usd) for t in turns],
            mode="lines+markers",
        ),
    ]
    return _figure(
        traces,
        xaxis={"title": "turn", "dtick": 1},
        yaxis={"title": "USD", "tickprefix": "$"},
        hovermode="closest",
    )
