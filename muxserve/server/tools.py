"""Forced tool calls: the request's tools, the schema a forced call must match (vLLM's), and
the generated text parsed back into OpenAI's `tool_calls`."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import Field

from muxserve.server.responses import FunctionCall, ToolCall
from muxserve.server.strict import Strict


class FunctionDefinition(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def forced_schema(tools: list[Tool] | None, choice: ToolChoice | None) -> dict[str, Any] | None:
    """The JSON schema a forced tool call must match: a named function's parameters, or for
    "required" an array of {name, parameters} of any tool; None when no call is forced."""
    if not tools or choice is None or choice in ("none", "auto"):
        return None
    empty: dict[str, Any] = {"type": "object", "properties": {}}
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return tool.function.parameters or empty
    one_of = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": t.function.parameters or empty,
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}


def parse_calls(choice: ToolChoice | None, text: str) -> list[ToolCall] | None:
    """The calls a forced tool choice generated, in OpenAI's shape; None if `text` does not
    parse (the generation was cut short)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(choice, NamedToolChoice):
        return [make_call(choice.function.name, value)]
    if not isinstance(value, list):
        return None
    calls = []
    for item in value:
        if not isinstance(item, dict) or "name" not in item:
            return None
        calls.append(make_call(str(item["name"]), item.get("parameters", {})))
    return calls


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def make_call(name: str, arguments: object) -> ToolCall:
    return ToolCall(
        id=call_id(),
        function=FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)),
    )
