"""The base of the request models: strict parsing, no unknown fields, immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """No "5" for 5, no NaN, and a field the model does not define is an error."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
