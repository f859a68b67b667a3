"""Synthetic token usage that varies per request yet keeps OpenAI's invariants.

Numbers come from a PRNG seeded by a hash of the request body, a per-app request
counter and the app seed, so one app with a fixed seed replays the same sequence.
Invariants: ``cached <= input``, ``cache_write <= input - cached``,
``reasoning <= output``, ``total = input + output``; reasoning only on reasoning
models; ``output <= max_output_tokens`` when a limit is given.

Prompt caching: a request with ``prompt_cache_key`` (or about 30% of the others)
reads from the cache. Prompts of 1024+ tokens hit in OpenAI's 1024 + 128k steps;
shorter prompts, which OpenAI never caches, get a smaller hit anyway so that short
test prompts still exercise the cached-token path (a deliberate deviation).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from dataclasses import dataclass, replace
from typing import Any, Final

from openai.types.completion_usage import (
    CompletionTokensDetails,
    CompletionUsage,
    PromptTokensDetails,
)
from openai.types.responses.response import (
    ToolUsage,
    ToolUsageImageGen,
    ToolUsageImageGenInputTokensDetails,
    ToolUsageImageGenOutputTokensDetails,
    ToolUsageWebSearch,
)
from openai.types.responses.response_usage import (
    InputTokensDetails,
    InputTokensDetailsCacheWriteTokensDetails,
    OutputTokensDetails,
    ResponseUsage,
)

from tokentill.fakeai.request import RequestInfo
from tokentill.fakeai.sdk import build

CHARS_PER_TOKEN: Final = 4
CACHE_MIN_PREFIX: Final = 1024
CACHE_STEP: Final = 128
MIN_TEXT_TOKENS: Final = 20
MAX_TEXT_TOKENS: Final = 400
_REASONING_RANGES: Final = {
    "none": (0, 0),
    "minimal": (0, 64),
    "low": (64, 512),
    "medium": (128, 2048),
    "high": (512, 4096),
    "xhigh": (1024, 8192),
}
_IMAGE_OUTPUT_TOKENS: Final = {"low": 272, "medium": 1056, "high": 4160, "auto": 1056}
_GOLDEN: Final = 0x9E3779B97F4A7C15
_MASK64: Final = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class ImageGenPlan:
    input_text_tokens: int
    input_image_tokens: int
    output_image_tokens: int

    @property
    def input_tokens(self) -> int:
        return self.input_text_tokens + self.input_image_tokens


@dataclass(frozen=True, slots=True)
class UsagePlan:
    """The token counts one request will be billed for."""

    input_tokens: int
    cached_tokens: int
    cache_write_30m_tokens: int
    cache_write_12h_tokens: int
    output_tokens: int
    reasoning_tokens: int
    tools_present: bool
    """Whether hosted tools were offered (then `tool_usage` is reported, zeros included)."""
    web_search_calls: int
    image_gen: ImageGenPlan | None
    truncated: bool
    """The output hit the request's token limit."""

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_30m_tokens + self.cache_write_12h_tokens

    @property
    def text_tokens(self) -> int:
        return self.output_tokens - self.reasoning_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def cut_output(self, output_tokens: int) -> UsagePlan:
        """This plan stopped early after `output_tokens` (reasoning is spent first)."""
        output = max(0, min(output_tokens, self.output_tokens))
        return replace(
            self,
            output_tokens=output,
            reasoning_tokens=min(self.reasoning_tokens, output),
            truncated=True,
        )


class UsageSynth:
    """Per-app source of request PRNGs: body hash x request counter x seed."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "big")
        self._counter = itertools.count()

    def rng_for(self, raw_body: bytes) -> random.Random:
        digest = int.from_bytes(hashlib.blake2b(raw_body, digest_size=8).digest(), "big")
        n = next(self._counter)
        return random.Random(digest ^ ((n * _GOLDEN) & _MASK64) ^ self.seed)


def _cached_tokens(info: RequestInfo, input_tokens: int, rng: random.Random) -> int:
    hit = info.prompt_cache_key is not None or rng.random() < 0.3
    if not hit or input_tokens < 2:
        return 0
    if input_tokens >= CACHE_MIN_PREFIX:
        steps = (input_tokens - CACHE_MIN_PREFIX) // CACHE_STEP
        return CACHE_MIN_PREFIX + CACHE_STEP * rng.randint(0, steps)
    return rng.randint(1, input_tokens // 2 + 1)


def _cache_writes(info: RequestInfo, uncached: int, rng: random.Random) -> tuple[int, int]:
    if uncached <= 0 or rng.random() >= 0.35:
        return 0, 0
    written = rng.randint(1, uncached)
    if info.cache_ttl == "30m":
        return written, 0
    if info.cache_ttl == "12h":
        return 0, written
    long_part = rng.choice((0, 0, written // 2, written))
    return written - long_part, long_part


def _image_gen(info: RequestInfo, rng: random.Random) -> ImageGenPlan | None:
    if not info.image_generation:
        return None
    quality = "auto"
    for tool in info.body.get("tools") or ():
        if isinstance(tool, dict) and tool.get("type") == "image_generation":
            requested = tool.get("quality")
            quality = requested if requested in _IMAGE_OUTPUT_TOKENS else "auto"
    return ImageGenPlan(
        input_text_tokens=rng.randint(20, 120),
        input_image_tokens=rng.choice((0, 0, 194, 388)),
        output_image_tokens=_IMAGE_OUTPUT_TOKENS[quality],
    )


def plan_usage(info: RequestInfo, rng: random.Random) -> UsagePlan:
    """Draw the usage of one request from `rng`, honouring its output limit."""
    estimate = -(-info.input_chars // CHARS_PER_TOKEN) + 4 * info.input_items
    input_tokens = max(8, estimate + rng.randint(0, 7))
    cached = _cached_tokens(info, input_tokens, rng)
    write_30m, write_12h = _cache_writes(info, input_tokens - cached, rng)
    text = sum(rng.randint(MIN_TEXT_TOKENS, MAX_TEXT_TOKENS) for _ in range(info.choices))
    reasoning = 0
    if info.reasoning:
        low, high = _REASONING_RANGES.get(info.reasoning_effort or "medium", (128, 2048))
        reasoning = rng.randint(low, high) * info.choices
    plan = UsagePlan(
        input_tokens=input_tokens,
        cached_tokens=cached,
        cache_write_30m_tokens=write_30m,
        cache_write_12h_tokens=write_12h,
        output_tokens=text + reasoning,
        reasoning_tokens=reasoning,
        tools_present=info.web_search or info.image_generation,
        web_search_calls=rng.randint(1, 3) if info.web_search else 0,
        image_gen=_image_gen(info, rng),
        truncated=False,
    )
    limit = info.max_output_tokens
    if limit is not None and plan.output_tokens > limit:
        return plan.cut_output(limit)
    return plan


def stopped_plan(plan: UsagePlan, reason: str | None, limit: int | None) -> UsagePlan:
    """The usage left when generation is stopped early for `reason`: a content filter
    keeps a third of the output; a forced token-limit stop ends at the request's limit
    (or halfway when the limit would not have been reached)."""
    if reason == "content_filter":
        return plan.cut_output(plan.output_tokens // 3)
    if reason == "max_output_tokens" and not plan.truncated:
        if limit is not None and limit < plan.output_tokens:
            return plan.cut_output(limit)
        return plan.cut_output(max(1, plan.output_tokens // 2))
    return plan


def response_usage(plan: UsagePlan) -> ResponseUsage:
    details: dict[str, Any] = {
        "cached_tokens": plan.cached_tokens,
        "cache_write_tokens": plan.cache_write_tokens,
    }
    if plan.cache_write_tokens:
        details["cache_write_tokens_details"] = build(
            InputTokensDetailsCacheWriteTokensDetails,
            ttl_30m_tokens=plan.cache_write_30m_tokens,
            ttl_12h_tokens=plan.cache_write_12h_tokens,
        )
    return build(
        ResponseUsage,
        input_tokens=plan.input_tokens,
        input_tokens_details=build(InputTokensDetails, **details),
        output_tokens=plan.output_tokens,
        output_tokens_details=build(OutputTokensDetails, reasoning_tokens=plan.reasoning_tokens),
        total_tokens=plan.total_tokens,
    )


def tool_usage(plan: UsagePlan) -> ToolUsage | None:
    """OpenAI's `tool_usage`: present when hosted tools were offered, zero-filled per family."""
    if not plan.tools_present:
        return None
    image = plan.image_gen or ImageGenPlan(0, 0, 0)
    return build(
        ToolUsage,
        image_gen=build(
            ToolUsageImageGen,
            input_tokens=image.input_tokens,
            input_tokens_details=build(
                ToolUsageImageGenInputTokensDetails,
                image_tokens=image.input_image_tokens,
                text_tokens=image.input_text_tokens,
            ),
            output_tokens=image.output_image_tokens,
            output_tokens_details=build(
                ToolUsageImageGenOutputTokensDetails,
                image_tokens=image.output_image_tokens,
                text_tokens=0,
            ),
            total_tokens=image.input_tokens + image.output_image_tokens,
        ),
        web_search=build(ToolUsageWebSearch, num_requests=plan.web_search_calls),
    )


def completion_usage(plan: UsagePlan) -> CompletionUsage:
    prompt: dict[str, Any] = {"cached_tokens": plan.cached_tokens, "audio_tokens": 0}
    if plan.cache_write_tokens:
        prompt["cache_write_tokens"] = plan.cache_write_tokens
    return build(
        CompletionUsage,
        prompt_tokens=plan.input_tokens,
        completion_tokens=plan.output_tokens,
        total_tokens=plan.total_tokens,
        prompt_tokens_details=build(PromptTokensDetails, **prompt),
        completion_tokens_details=build(
            CompletionTokensDetails,
            reasoning_tokens=plan.reasoning_tokens,
            audio_tokens=0,
            accepted_prediction_tokens=0,
            rejected_prediction_tokens=0,
        ),
    )
