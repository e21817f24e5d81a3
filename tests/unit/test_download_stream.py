"""The streamed download answer (kiln.api.routers.files.download_json): valid JSON
whose base64 joins across chunks of any length."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import pytest

from kiln.api.routers.files import download_json


class PiecesDownload:
    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.size = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            self.size += len(piece)
            yield piece


@pytest.mark.parametrize(
    "pieces",
    [[], [b"a"], [b"ab"], [b"abc"], [b"a", b"bc", b"defg", b"h", b"ijklmnopq"], [bytes(range(256))] * 7],
)
async def test_pieces_of_any_length_join_into_one_base64_text(pieces: list[bytes]) -> None:
    download = PiecesDownload(pieces)
    sent = [part async for part in download_json({"filename": 'odd "name".bin'}, download)]  # type: ignore[arg-type]
    answer = json.loads(b"".join(sent))
    assert answer == {
        "filename": 'odd "name".bin',
        "content": base64.b64encode(b"".join(pieces)).decode(),
        "size": len(b"".join(pieces)),
    }
    # Every piece of content but the last is whole base64 (no padding inside).
    assert all(b"=" not in part for part in sent[1:-1])
