"""Wire models of ``POST /v1/vms/{vm_id}/stage-env`` (the SDK's ``vms.stage_env``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StagedEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env_name: str
    value: str


class StageEnvRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entries: list[StagedEntry] = Field(min_length=1)


class StageEnvResponse(BaseModel):
    # Names only: a staged value never leaves the server again.
    staged: list[str]
