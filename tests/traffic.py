"""The demo's own traffic, for tests that want the world's variety rather than their own."""

from __future__ import annotations

import contextlib
import random

import httpx
import openai

from tokentill.demo import make_call, plan_call, user_names


def demo_traffic(url: str, count: int, seed: int) -> None:
    """`count` calls of the demo's mix through the tokentill at `url`: plain, streamed and
    background responses, Chat Completions, agents' tool loops over HTTP and WebSocket,
    web search, every model and tier, and every scenario the fake plays (incomplete,
    content filter, failed, HTTP errors, streams cut off)."""
    rng = random.Random(seed)
    names, weights = user_names()
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-demo", max_retries=0)
    for _ in range(count):
        with contextlib.suppress(openai.APIError, httpx.HTTPError):  # some fail on purpose
            make_call(client, plan_call(rng, names, weights))
