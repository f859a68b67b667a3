"""The fake's organization Costs and Usage endpoints: OpenAI's shapes, parameters and
errors, and figures equal to its ledger priced by genai-prices."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from genai_prices import Usage, calc_price

from tests.servers import serve_in_thread
from tokentill.fakeai import create_fake_app

ADMIN = {"authorization": "Bearer sk-admin-test"}
DAY = 86_400


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve_in_thread(create_fake_app(seed=5)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
        client.responses.create(model="gpt-4o-mini", input="hello there", user="u1")
        client.responses.create(model="gpt-4o-mini", input="again", service_tier="default")
        client.responses.create(model="o4-mini", input="think", stream=True).close()
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "chat"}]
        )
        client.responses.create(model="gpt-unlisted-preview", input="new model")
        with pytest.raises(openai.InternalServerError):
            client.responses.create(
                model="gpt-4o", input="x", extra_headers={"x-fake-scenario": "http_500"}
            )
        yield url


def get(base: str, path: str, headers: dict[str, str] = ADMIN, **params: Any) -> httpx.Response:
    return httpx.get(base + path, params=params, headers=headers)


def amounts(response: httpx.Response) -> Any:
    return json.loads(response.text, parse_float=Decimal)


def first_day(base: str) -> int:
    """The UTC day the module's traffic started on (not "today": midnight may have passed)."""
    first = min(row["created_at"] for row in httpx.get(base + "/_fake/ledger").json())
    return int(first - first % DAY)


def test_costs_equal_the_ledger_priced_by_genai_prices(base: str) -> None:
    ledger = httpx.get(base + "/_fake/ledger").json()
    expected = Decimal(0)
    for row in ledger:
        if row["model"] == "gpt-unlisted-preview":
            # Not in the public list: billed at the fake's stated rates ($1 / $0.5 / $4).
            uncached = row["input_tokens"] - row["cached_input_tokens"]
            expected += (
                uncached * Decimal(1)
                + row["cached_input_tokens"] * Decimal("0.5")
                + row["output_tokens"] * Decimal(4)
            ) / 1_000_000
            continue
        expected += calc_price(
            Usage(
                input_tokens=row["input_tokens"],
                cache_read_tokens=row["cached_input_tokens"],
                output_tokens=row["output_tokens"],
            ),
            row["model"],
            provider_id="openai",
            genai_request_timestamp=datetime.fromtimestamp(row["created_at"], UTC),
        ).total_price
    day = first_day(base)
    page = amounts(get(base, "/v1/organization/costs", start_time=day, end_time=day + DAY))
    assert page["object"] == "page" and page["has_more"] is False
    (bucket,) = page["data"]
    assert bucket["object"] == "bucket"
    assert (bucket["start_time"], bucket["end_time"]) == (day, day + DAY)
    (total,) = bucket["results"]
    assert total == {
        "object": "organization.costs.result",
        "amount": {"value": expected, "currency": "usd"},
        "line_item": None,
        "project_id": None,
    }
    lines = amounts(
        get(
            base,
            "/v1/organization/costs",
            start_time=day,
            end_time=day + DAY,
            group_by=["line_item", "project_id"],
        )
    )["data"][0]["results"]
    names = {line["line_item"] for line in lines}
    assert {"gpt-4o-mini-2024-07-18, input", "gpt-4o-mini-2024-07-18, output"} <= names
    assert "gpt-unlisted-preview, output" in names
    assert all(line["project_id"] == "proj_fakeupstream" for line in lines)
    assert sum(line["amount"]["value"] for line in lines) == expected


def test_pages_of_buckets(base: str) -> None:
    day = first_day(base)
    start = day - 3 * DAY
    seen: list[int] = []
    values: list[Decimal] = []
    params: dict[str, Any] = {"start_time": start, "end_time": day + DAY, "limit": 1}
    while True:
        page = amounts(get(base, "/v1/organization/costs", **params))
        seen += [b["start_time"] for b in page["data"]]
        values += [r["amount"]["value"] for b in page["data"] for r in b["results"]]
        if not page["has_more"]:
            assert page["next_page"] is None
            break
        params["page"] = page["next_page"]
    assert seen == [start + i * DAY for i in range(4)]  # empty days are buckets too
    assert len(values) == 1  # only the last day was billed


def test_usage_counts_requests_per_model(base: str) -> None:
    day = first_day(base)
    page = get(
        base,
        "/v1/organization/usage/completions",
        start_time=day,
        end_time=day + DAY,
        group_by="model",
    ).json()
    results = {r["model"]: r for r in page["data"][0]["results"]}
    assert results["gpt-4o-mini-2024-07-18"]["num_model_requests"] == 2
    assert results["gpt-4o-2024-08-06"]["num_model_requests"] == 1  # the 500 was not billed
    assert results["o4-mini-2025-04-16"]["object"] == "organization.usage.completions.result"
    hourly = get(
        base,
        "/v1/organization/usage/completions",
        start_time=day,
        end_time=day + DAY,
        bucket_width="1h",
    ).json()
    assert len(hourly["data"]) == 24 and hourly["has_more"] is False
    assert sum(r["num_model_requests"] for b in hourly["data"] for r in b["results"]) == 5


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/organization/costs", {}, "start_time"),
        ("/v1/organization/costs", {"start_time": "yesterday"}, "start_time"),
        ("/v1/organization/costs", {"start_time": 100, "end_time": 50}, "end_time"),
        ("/v1/organization/costs", {"start_time": 100, "limit": 181}, "limit"),
        ("/v1/organization/costs", {"start_time": 100, "limit": 0}, "limit"),
        ("/v1/organization/costs", {"start_time": 100, "bucket_width": "1h"}, "bucket_width"),
        ("/v1/organization/costs", {"start_time": 100, "group_by": "model"}, "group_by"),
        ("/v1/organization/costs", {"start_time": 100, "page": "nope"}, "page"),
        ("/v1/organization/usage/completions", {"start_time": 100, "limit": 32}, "limit"),
    ],
)
def test_bad_parameters_get_openai_errors(
    base: str, path: str, params: dict[str, Any], param: str
) -> None:
    response = get(base, path, **params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_needs_an_admin_key(base: str) -> None:
    project_key = get(
        base, "/v1/organization/costs", {"authorization": "Bearer sk-test"}, start_time=0
    )
    assert project_key.status_code == 401
    assert "api.usage.read" in project_key.json()["error"]["message"]
    assert get(base, "/v1/organization/costs", {}, start_time=0).status_code == 401
