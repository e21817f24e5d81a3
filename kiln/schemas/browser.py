"""Wire models of the browser routes (``/v1/browser/sessions/...``,
``/v1/browser/interactions/...``), with the keys InstaVM's SDK sends and reads.

Times are milliseconds, as the SDK sends them. Unknown keys are ignored, as
the SDK's other routes do here: its requests carry keys (``url`` of content
in local mode) that mean nothing to a server-side session.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from kiln.schemas.bodies import RequestBody

MAX_WAIT_MS = 300_000
TimeoutMs = Field(default=30_000, ge=0, le=MAX_WAIT_MS)


class BrowserSessionCreate(RequestBody):
    viewport_width: int = Field(default=1920, ge=100, le=3840)
    viewport_height: int = Field(default=1080, ge=100, le=2160)
    user_agent: str | None = Field(default=None, max_length=512)


class BrowserSessionRecord(BaseModel):
    session_id: str
    id: str  # the same: the SDK's list reads either
    vm_id: str
    status: str  # active while its VM runs, else the VM's status
    viewport_width: int
    viewport_height: int
    user_agent: str | None
    created_at: str
    expires_at: str
    # How often the session's browser died and was started again in its VM.
    browser_restarts: int


class BrowserSessionList(BaseModel):
    sessions: list[BrowserSessionRecord]
    count: int


class BrowserSessionClosed(BaseModel):
    success: bool
    session_id: str
    status: str


class SessionScoped(RequestBody):
    session_id: str = Field(min_length=1, max_length=128)


class NavigateRequest(SessionScoped):
    url: str = Field(min_length=1, max_length=8192)
    wait_timeout: int = TimeoutMs


class ClickRequest(SessionScoped):
    selector: str = Field(min_length=1, max_length=4096)
    force: bool = False
    timeout: int = TimeoutMs


class TypeRequest(SessionScoped):
    selector: str = Field(min_length=1, max_length=4096)
    text: str = Field(max_length=100_000)
    delay: int = Field(default=100, ge=0, le=5_000)
    timeout: int = TimeoutMs


class FillRequest(SessionScoped):
    selector: str = Field(min_length=1, max_length=4096)
    value: str = Field(max_length=1_000_000)
    timeout: int = TimeoutMs


class ScrollRequest(SessionScoped):
    selector: str | None = Field(default=None, min_length=1, max_length=4096)
    x: int | None = None
    y: int | None = None
    timeout: int = TimeoutMs

    @model_validator(mode="after")
    def _something_to_scroll_to(self) -> ScrollRequest:
        if self.selector is None and self.x is None and self.y is None:
            raise ValueError("give a selector, or x and/or y")
        return self


WaitCondition = Literal[
    "visible", "hidden", "attached", "detached", "load", "domcontentloaded", "networkidle", "timeout"
]


class WaitRequest(SessionScoped):
    condition: WaitCondition
    selector: str | None = Field(default=None, min_length=1, max_length=4096)
    timeout: int = TimeoutMs

    @model_validator(mode="after")
    def _selector_when_needed(self) -> WaitRequest:
        if self.condition in ("visible", "hidden", "attached", "detached") and self.selector is None:
            raise ValueError(f"condition {self.condition!r} needs a selector")
        return self


class Clip(BaseModel):
    x: float = Field(ge=0)
    y: float = Field(ge=0)
    width: float = Field(gt=0, le=16384)
    height: float = Field(gt=0, le=16384)


class ScreenshotRequest(SessionScoped):
    full_page: bool = True
    format: Literal["png", "jpeg", "webp"] = "png"
    clip: Clip | None = None
    quality: int | None = Field(default=None, ge=0, le=100)


class ExtractRequest(SessionScoped):
    selector: str = Field(default="body", min_length=1, max_length=4096)
    attributes: list[str] | None = Field(default=None, max_length=64)


class ContentRequest(SessionScoped):
    include_interactive: bool = True
    include_anchors: bool = True
    max_anchors: int = Field(default=50, ge=0, le=1000)


class InteractionResult(BaseModel):
    success: bool = True
    session_id: str
    data: dict[str, Any] = {}
