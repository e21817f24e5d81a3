"""Wire models of file transfer (``/upload``, ``/download``)."""

from __future__ import annotations

from pydantic import BaseModel


class UploadResponse(BaseModel):
    success: bool
    path: str
    size: int


class DownloadResponse(BaseModel):
    filename: str
    content: str  # base64
    size: int
