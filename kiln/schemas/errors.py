"""The error bodies: FastAPI's ``detail`` shape, as the seed documents it."""

from __future__ import annotations

from pydantic import BaseModel, Field


# One problem with the request. Deliberately without FastAPI's ``input``/``ctx``:
# echoing the input back would copy secrets (env values, passwords) into error
# bodies and logs, and the seed's ``ValidationError`` has only these three fields.
# (No docstring: pydantic would publish it as a "description" the seed lacks.)
class ValidationError(BaseModel):

    loc: list[str | int] = Field(title="Location")
    msg: str = Field(title="Message")
    type: str = Field(title="Error Type")


class ErrorMessage(BaseModel):
    """Every error but 422: ``{"detail": "<what went wrong>"}``."""

    detail: str
