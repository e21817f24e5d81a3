"""Wire models of ``POST /v1/vms/{vm_id}/stage-env`` (the SDK's ``vms.stage_env``)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from kiln.schemas.bodies import RequestBody


class StagedEntry(RequestBody):
    env_name: str
    value: str


class StageEnvRequest(RequestBody):
    entries: list[StagedEntry] = Field(min_length=1)


class StageEnvResponse(BaseModel):
    # Names only: a staged value never leaves the server again.
    staged: list[str]
