"""The one strict pydantic base: unknown fields are errors, assignments are validated.

``Strict`` serves stored records (a manifest); ``SpecModel`` adds what a hand-written YAML spec
needs, an empty value (``lr:`` with nothing after it) read as unset. Neither takes an infinite or
NaN number (``.inf`` in YAML): no field means "forever" by one, and a retry budget of ``.inf`` would
retry forever.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["SpecModel", "Strict"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SpecModel(Strict):
    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v == "" else v
