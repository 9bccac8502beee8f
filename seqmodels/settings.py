"""The base of every settings model in seqmodels (config blocks, architectures, training)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    # Unknown keys are almost always typos: refuse them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid")
