"""The error bodies: FastAPI's ``detail`` shape, as the seed documents it."""

from __future__ import annotations

from typing import Any

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


# The type FastAPI's ``responses=`` takes, for constants shared by routes.
Responses = dict[int | str, dict[str, Any]]


def error_responses(*statuses: int) -> Responses:
    """OpenAPI entries documenting these error statuses with the ``detail`` shape."""
    return {status: {"model": ErrorMessage} for status in statuses}
