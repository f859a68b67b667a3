"""Test controls carried by request headers: which scenario to play and how slowly.

``x-fake-scenario``
    ``completed`` (the default when absent), ``incomplete``, ``content_filter``,
    ``failed``, ``http_401``, ``http_429``, ``http_500``, ``garbage``, ``cut``, ``slow``.
``x-fake-delay-ms``
    Pause between two stream events (default 0); with ``slow``, also the wait before
    the answer starts (default 500 ms there).
``x-fake-background-delay-ms``
    How long a ``background`` response takes to reach its terminal status (default 300).
``x-fake-created-at``
    The ``created_at`` (Unix seconds) the response claims instead of now, so tests can
    make traffic of past days (Responses and Chat Completions).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from starlette.datastructures import Headers

from tokentill.fakeai.errors import bad_fake_header

SCENARIO_HEADER = "x-fake-scenario"
DELAY_HEADER = "x-fake-delay-ms"
BACKGROUND_DELAY_HEADER = "x-fake-background-delay-ms"
CREATED_AT_HEADER = "x-fake-created-at"

DEFAULT_BACKGROUND_DELAY_MS = 300.0
DEFAULT_SLOW_DELAY_MS = 500.0
_MAX_DELAY_MS = 600_000.0


class Scenario(StrEnum):
    COMPLETED = "completed"
    INCOMPLETE = "incomplete"
    CONTENT_FILTER = "content_filter"
    FAILED = "failed"
    HTTP_401 = "http_401"
    HTTP_429 = "http_429"
    HTTP_500 = "http_500"
    GARBAGE = "garbage"
    CUT = "cut"
    SLOW = "slow"


_SCENARIOS = {scenario.value: scenario for scenario in Scenario}


@dataclass(frozen=True, slots=True)
class Controls:
    scenario: Scenario
    event_delay_s: float
    """Pause before every stream event but the first."""
    initial_delay_s: float
    """Pause before the answer starts (only the ``slow`` scenario has one)."""
    background_delay_s: float
    created_at: int | None = None
    """The creation time the answer claims (Unix seconds); None: now."""


DEFAULT_CONTROLS = Controls(Scenario.COMPLETED, 0.0, 0.0, DEFAULT_BACKGROUND_DELAY_MS / 1000)


def _created_at(headers: Headers) -> int | None:
    raw = headers.get(CREATED_AT_HEADER)
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise bad_fake_header(CREATED_AT_HEADER, raw, "Unix seconds")
    return int(raw)


def _milliseconds(headers: Headers, name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise bad_fake_header(name, raw, "a number of milliseconds") from None
    if not 0 <= value <= _MAX_DELAY_MS:
        raise bad_fake_header(name, raw, f"between 0 and {_MAX_DELAY_MS:.0f} milliseconds")
    return value


def read_controls(headers: Headers) -> Controls:
    """Parse the fake's control headers; a malformed one is a 400 naming the header."""
    raw_scenario = headers.get(SCENARIO_HEADER)
    delay_ms = _milliseconds(headers, DELAY_HEADER)
    background_ms = _milliseconds(headers, BACKGROUND_DELAY_HEADER)
    created_at = _created_at(headers)
    if raw_scenario is None and delay_ms is None and background_ms is None and created_at is None:
        return DEFAULT_CONTROLS
    scenario = Scenario.COMPLETED
    if raw_scenario is not None:
        found = _SCENARIOS.get(raw_scenario.strip().lower())
        if found is None:
            raise bad_fake_header(SCENARIO_HEADER, raw_scenario, "one of " + ", ".join(_SCENARIOS))
        scenario = found
    initial_ms = 0.0
    if scenario is Scenario.SLOW:
        initial_ms = DEFAULT_SLOW_DELAY_MS if delay_ms is None else delay_ms
    return Controls(
        scenario=scenario,
        event_delay_s=(delay_ms or 0.0) / 1000,
        initial_delay_s=initial_ms / 1000,
        background_delay_s=(DEFAULT_BACKGROUND_DELAY_MS if background_ms is None else background_ms)
        / 1000,
        created_at=created_at,
    )
