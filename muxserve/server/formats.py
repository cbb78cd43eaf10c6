"""Structured output as requests ask for it: OpenAI's `response_format`, vLLM's `guided_*`
fields and `structured_outputs`, turned into the engine's `StructuredOutput`."""

from __future__ import annotations

import json
from typing import Any, Literal, cast

from pydantic import ConfigDict, Field

from muxserve.errors import InvalidSamplingParamsError
from muxserve.sampling_params import StructuredOutput
from muxserve.server.strict import Strict


class JsonSchemaFormat(Strict):
    """`response_format.json_schema`."""

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    """`response_format`: text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)  # structural_tag's keys


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs` (the newer spelling of the `guided_*` fields)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool | None = None  # ignored: we never allow any
    disable_fallback: bool | None = None  # ignored: one backend
    disable_additional_properties: bool | None = None  # ignored
    backend: str | None = None  # ignored
    structural_tag: str | None = None


def structured_output(
    rf: ResponseFormat | None,
    so: StructuredOutputs | None,
    guided: dict[str, object],
    ws: str | None,
) -> StructuredOutput | None:
    """The one structured output asked for (by whichever field), or None; a 400-worthy
    InvalidSamplingParamsError naming the field for two at once or an unsupported kind.

    `guided` maps vLLM's guided_json / guided_regex / guided_choice / guided_grammar to their
    values; `ws` is guided_whitespace_pattern.
    """
    found: list[StructuredOutput] = []
    if rf is not None and rf.type == "json_object":
        found.append(StructuredOutput("json_object", "", "response_format", ws))
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.schema_ if rf.json_schema is not None else None
        if schema is None:
            raise InvalidSamplingParamsError(
                "response_format.json_schema.schema is required", "response_format"
            )
        found.append(StructuredOutput("json_schema", json.dumps(schema), "response_format", ws))
    elif rf is not None and rf.type == "structural_tag":
        raise InvalidSamplingParamsError(
            "response_format structural_tag is not supported", "response_format"
        )
    if so is not None:
        if so.structural_tag is not None:
            raise InvalidSamplingParamsError(
                "structured_outputs.structural_tag is not supported", "structured_outputs"
            )
        ws_so = so.whitespace_pattern or ws
        for kind, value in (
            ("json_schema", so.json_),
            ("regex", so.regex),
            ("choice", so.choice),
            ("grammar", so.grammar),
        ):
            if value is not None:
                found.append(_spec(kind, value, "structured_outputs", ws_so))
        if so.json_object:
            found.append(StructuredOutput("json_object", "", "structured_outputs", ws_so))
    kinds = {
        "guided_json": "json_schema",
        "guided_regex": "regex",
        "guided_choice": "choice",
        "guided_grammar": "grammar",
    }
    for field, guided_value in guided.items():
        if guided_value is not None:
            found.append(_spec(kinds[field], guided_value, field, ws))
    if len(found) > 1:
        raise InvalidSamplingParamsError(
            "ask for one kind of structured output: " + ", ".join(sorted({f.param for f in found})),
            found[1].param,
        )
    return found[0] if found else None


def _spec(kind: str, value: object, param: str, ws: str | None) -> StructuredOutput:
    if kind == "choice":
        values = cast(list[str], value)
        if not values:
            raise InvalidSamplingParamsError(f"{param} needs at least one choice", param)
        text = json.dumps(values)
    elif kind == "json_schema" and not isinstance(value, str):
        text = json.dumps(value)
    else:
        text = cast(str, value)
    return StructuredOutput(kind, text, param, ws)  # type: ignore[arg-type]
