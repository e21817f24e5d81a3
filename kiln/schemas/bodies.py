"""The base of every request body: a field Kiln does not know is a 422 naming
it (``loc`` ends with the field, ``type`` is ``extra_forbidden``), never
ignored, so that a client never believes a setting took effect that Kiln has no
such setting for. The seed's models (``kiln.schemas.vms``) refuse the same way
but keep the seed's published schema."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
