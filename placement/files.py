"""Reading the planner's YAML inputs: errors name the file and the dotted key.

One helper for all three input files, so a typo anywhere reads the same way:
`workload.yaml: models.3.rate: Input should be greater than 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from muxserve.config import format_validation_error
from muxserve.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    """Base of every input schema: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml(path: str | Path) -> object:
    """Parse a YAML file; a missing or malformed file is a `ConfigError` naming it."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: no such file") from e
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{p}: malformed YAML{where}: {problem}") from e


def validate(schema: type[T], raw: object, source: str) -> T:
    """Validate parsed YAML against a schema; errors name `source` and each dotted key."""
    if not isinstance(raw, dict):
        got = type(raw).__name__
        raise ConfigError(f"{source}: expected a mapping at the top level, got {got}")
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e)}") from e


def load_file(schema: type[T], path: str | Path) -> T:
    """`read_yaml` then `validate`."""
    return validate(schema, read_yaml(path), str(path))
