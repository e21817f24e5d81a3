"""The router's own answers (errors, the link redirect): short HTML pages a person can read."""

from __future__ import annotations

import html

from aiohttp import web

TITLES = {
    401: "Sign-in needed",
    404: "No such share",
    502: "Nothing answers on this port",
    503: "The VM is not running",
    504: "The VM did not answer in time",
}


def page(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    title = TITLES.get(status, "Kiln share router")
    body = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{status} {html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
        "<hr><p><small>Kiln share router</small></p></body></html>"
    )
    headers = {"Cache-Control": "no-store", **(headers or {})}
    return web.Response(status=status, text=body, content_type="text/html", headers=headers)
