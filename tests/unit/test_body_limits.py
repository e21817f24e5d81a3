"""Which body limit a route gets: uploads (``/upload`` and a volume's file
upload) take the upload limit, every other route the request limit."""

from __future__ import annotations

from kiln.api.app import VOLUME_UPLOAD_PATH
from kiln.api.limits import BodySizeLimit


async def app(scope: object, receive: object, send: object) -> None:
    pass


def test_uploads_get_their_own_limit_and_nothing_else_does() -> None:
    limits = BodySizeLimit(app, 16, limits_by_path={"/upload": 1000}, limits_by_pattern=[(VOLUME_UPLOAD_PATH, 1000)])
    assert limits.limit_for("/upload") == 1000
    assert limits.limit_for("/v1/volumes/vol-1/files/upload") == 1000
    others = ("/v1/volumes/vol-1/files", "/v1/volumes/a/b/files/upload", "/v1/volumes/v/files/upload/x", "/v1/vms")
    for path in others:
        assert limits.limit_for(path) == 16, path
