"""The filters every dashboard view shares, read from and written to the URL.

`from` and `to` are whole UTC days, both inclusive (what a person means by "from the
1st to the 25th"); the admin API's `end` is exclusive, so `to` becomes the next midnight.
Whole days keep every chart on the daily rollups. `model`, `user` and `tag` may repeat or
hold comma-separated lists; `tag` is `key=value`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date, timedelta
from typing import Any
from urllib.parse import urlencode

from starlette.datastructures import QueryParams

DEFAULT_DAYS = 30  # the admin API's default range
MAX_DAYS = 3 * 366


class FilterError(ValueError):
    """A filter in the URL that cannot be used, with what to change."""


@dataclass(frozen=True)
class ViewFilters:
    start: date
    end: date  # inclusive
    models: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # "key=value"

    @classmethod
    def default(cls, today: date) -> ViewFilters:
        return cls(start=today - timedelta(days=DEFAULT_DAYS - 1), end=today)

    @classmethod
    def parse(cls, query: QueryParams, today: date) -> ViewFilters:
        base = cls.default(today)
        end = _day(query.get("to"), "to") or base.end
        start = _day(query.get("from"), "from") or end - timedelta(days=DEFAULT_DAYS - 1)
        if start > end:
            raise FilterError(f"from ({start}) is after to ({end})")
        if (end - start).days >= MAX_DAYS:
            raise FilterError("the range is longer than 3 years: pick a shorter one")
        tags = _items(query.getlist("tag"))
        for tag in tags:
            key, sep, _ = tag.partition("=")
            if not sep or not key:
                raise FilterError(f"tag {tag!r}: expected key=value, for example team=search")
        return cls(
            start=start,
            end=end,
            models=_items(query.getlist("model")),
            users=_items(query.getlist("user")),
            tags=tags,
        )

    @property
    def span(self) -> tuple[date, date]:
        return self.start, self.end

    @property
    def tag_keys(self) -> set[str]:
        return {t.partition("=")[0] for t in self.tags}

    def api_params(self) -> dict[str, Any]:
        """The same filters as the admin API's query parameters (api/params.py)."""
        return {
            "start": self.start,
            "end": self.end + timedelta(days=1),
            "model": list(self.models),
            "user": list(self.users),
            "tag": list(self.tags),
        }

    def query(self, **changes: Any) -> str:
        """This view's filters as a query string (`changes` replace fields), for links."""
        f = replace(self, **changes) if changes else self
        pairs: list[tuple[str, str]] = [("from", str(f.start)), ("to", str(f.end))]
        pairs += [("model", ",".join(f.models))] if f.models else []
        pairs += [("user", ",".join(f.users))] if f.users else []
        pairs += [("tag", ",".join(f.tags))] if f.tags else []
        return urlencode(pairs)


def _day(text: str | None, name: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise FilterError(f"{name}: {text!r} is not a date (YYYY-MM-DD)") from None


def _items(values: Iterable[str]) -> tuple[str, ...]:
    out = (part.strip() for value in values for part in value.split(","))
    return tuple(dict.fromkeys(p for p in out if p))[:200]
