"""The base of every settings model in seqmodels (config blocks, architectures, training)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class Settings(BaseModel):
    # Unknown keys are almost always typos: refuse them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers_in_e_notation(cls, data: Any) -> Any:
        """PyYAML reads `max_steps: 1e4` (no dot) as the string "1e4"; an integer field takes
        the whole number meant. (Float fields already accept such strings.)"""
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if isinstance(value, str) and field.annotation in (int, int | None):
                try:
                    number = float(value)
                except ValueError:
                    continue  # not a number: the field's own error names it
                if number.is_integer():
                    data = {**data, name: int(number)}
        return data
