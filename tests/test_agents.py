"""Agents through tokentill: tool loops and structured outputs, metered once per response.

The fake upstream calls a function when one is offered and the turn allows it, takes
the output on the next turn (`previous_response_id`, or the chat `tool` message), and
answers `json_schema` formats with JSON that validates. Clients: the openai SDK, and
the OpenAI Agents SDK (openai-agents) running a real agent loop.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from tests.conftest import Running

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["c", "f"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
    "strict": True,
}


class Forecast(BaseModel):
    city: str
    highs: list[int]
    sunny: bool


def _check_arguments(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit", "days"}
    assert args["unit"] in ("c", "f") and 1 <= args["days"] <= 7


def test_a_responses_tool_loop_is_metered_once_per_response(tokentill: Running) -> None:
    client = tokentill.client()
    first = client.responses.create(
        model="gpt-4.1-mini", input="Weather in Paris?", tools=[WEATHER_TOOL], user="agent-1"
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    _check_arguments(calls[0].arguments)
    assert not [item for item in first.output if item.type == "message"]

    # Streamed second turn: the SDK's stream helper rebuilds the final response.
    with client.responses.stream(
        model="gpt-4.1-mini",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
        tools=[WEATHER_TOOL],
        user="agent-1",
    ) as stream:
        second = stream.get_final_response()
    assert second.output_text and not [i for i in second.output if i.type == "function_call"]

    # A forced call, streamed: the arguments arrive in deltas and add up.
    with client.responses.stream(
        model="gpt-4.1-mini",
        input="again",
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        user="agent-1",
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        third = stream.get_final_response()
    forced = [item for item in third.output if item.type == "function_call"]
    assert len(forced) == 1 and "".join(deltas) == forced[0].arguments

    rows = tokentill.rows("user_id = 'agent-1'")
    assert [r["response_id"] for r in rows] == [first.id, second.id, third.id]
    assert rows[1]["previous_response_id"] == first.id
    assert [r["streamed"] for r in rows] == [False, True, True]
    assert all(r["status"] == "completed" and r["output_tokens"] for r in rows)


def test_a_chat_tool_loop_is_metered_once_per_completion(tokentill: Running) -> None:
    client = tokentill.client()
    tools: list[Any] = [
        {
            "type": "function",
            "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")},
        }
    ]
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    first = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=tools, user="chat-agent"
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    _check_arguments(call.function.arguments)
    messages += [
        choice.message.model_dump(exclude_unset=True),
        {"role": "tool", "tool_call_id": call.id, "content": "rain"},
    ]
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, tools=tools, stream=True, user="chat-agent"
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # Streamed calls: the SDK's accumulated arguments are valid JSON.
    streamed = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=messages[:1],
            tools=tools,
            tool_choice="required",
            stream=True,
            user="chat-agent",
        )
    )
    arguments = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in streamed
        if c.choices and c.choices[0].delta.tool_calls
    )
    _check_arguments(arguments)
    rows = tokentill.rows("user_id = 'chat-agent'")
    assert [r["response_id"] for r in rows] == [first.id, chunks[0].id, streamed[0].id]
    assert all(r["status"] == "completed" and r["input_tokens"] for r in rows)


def test_structured_outputs_parse_into_the_requested_type(tokentill: Running) -> None:
    client = tokentill.client()
    parsed = client.responses.parse(model="gpt-4o", input="forecast", text_format=Forecast)
    assert isinstance(parsed.output_parsed, Forecast)
    chat = client.chat.completions.parse(
        model="gpt-4o", messages=[{"role": "user", "content": "forecast"}], response_format=Forecast
    )
    assert isinstance(chat.choices[0].message.parsed, Forecast)
    assert len(tokentill.rows()) == 2


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_the_agents_sdk_runs_its_tool_loop_through_tokentill(
    tokentill: Running, transport: str
) -> None:
    """openai-agents as the client: over HTTP, and over the Responses WebSocket mode
    (what `set_default_openai_responses_transport("websocket")` selects)."""
    from agents import (
        Agent,
        OpenAIResponsesModel,
        RunConfig,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from agents.models.openai_responses import OpenAIResponsesWSModel

    set_tracing_disabled(True)
    called: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        called.append(city)
        return f"sunny in {city}"

    async def run() -> Any:
        client = openai.AsyncOpenAI(
            base_url=tokentill.url + "/v1", api_key="sk-test", max_retries=0
        )
        model_type = OpenAIResponsesWSModel if transport == "websocket" else OpenAIResponsesModel
        model = model_type(model="gpt-4.1-mini", openai_client=client)
        agent = Agent(
            name="forecaster",
            instructions="Answer with the weather.",
            tools=[get_weather],
            model=model,
        )
        try:
            return await Runner.run(
                agent,
                "Weather in Rome?",
                run_config=RunConfig(tracing_disabled=True),
                max_turns=4,
            )
        finally:
            if isinstance(model, OpenAIResponsesWSModel):
                await model.close()

    result = asyncio.run(run())
    assert called and result.final_output
    ids = [r.response_id for r in result.raw_responses]
    assert len(ids) == 2
    rows = tokentill.rows()
    assert sorted(r["response_id"] for r in rows) == sorted(ids)
    assert {r["transport"] for r in rows} == {transport}
