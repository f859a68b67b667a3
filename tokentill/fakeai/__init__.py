"""A fake OpenAI API upstream for tests, demos and benchmarks.

Payloads are the openai SDK's own models (``Response``, its stream events,
``ChatCompletion``, ``ChatCompletionChunk``), serialised as OpenAI sends them. Usage
numbers vary per request but keep OpenAI's invariants, and every billed answer is
recorded in a ledger served at ``/_fake/ledger``. Scenarios (errors, truncation,
slowness, broken streams) are chosen per request with ``x-fake-*`` headers; see
`tokentill.fakeai.scenarios`.
"""

from tokentill.fakeai.app import FakeUpstream, create_fake_app
from tokentill.fakeai.ledger import Ledger, LedgerEntry
from tokentill.fakeai.scenarios import Scenario
from tokentill.fakeai.server import run_fake_upstream

__all__ = [
    "FakeUpstream",
    "Ledger",
    "LedgerEntry",
    "Scenario",
    "create_fake_app",
    "run_fake_upstream",
]
