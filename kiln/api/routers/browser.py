"""Browser routes (the SDK's ``BrowserManager`` / ``BrowserSession``): sessions
are VMs of the browser image, interactions drive their Chromium
(``kiln.services.browser``).

Errors as the SDK maps them: an unknown session (or another user's) 404, a
selector that matches nothing 404 (``ElementNotFoundError``), a wait or an
action that ran out of time 408 (``BrowserTimeoutError``), a navigation the
session's egress policy forbids 403 naming the policy (the SDK shows a 403's
``detail``), a page that did not load 502, a browser that crashed 503 (it is
restarted; the session's ``browser_restarts`` counts it), over a quota 429.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from kiln.api.deps import CurrentUser, get_services
from kiln.schemas.browser import (
    BrowserSessionClosed,
    BrowserSessionCreate,
    BrowserSessionList,
    BrowserSessionRecord,
    ClickRequest,
    ContentRequest,
    ExtractRequest,
    FillRequest,
    NavigateRequest,
    ScreenshotRequest,
    ScrollRequest,
    TypeRequest,
    WaitRequest,
)
from kiln.schemas.errors import ErrorMessage, error_responses
from kiln.services.browser import BrowserService, viewport_of
from kiln.services.sessions import public_status
from kiln.store.models import Vm


def get_browser_service(request: Request) -> BrowserService:
    return get_services(request).browser


Browsers = Annotated[BrowserService, Depends(get_browser_service)]

router = APIRouter(tags=["browser"], responses={401: {"model": ErrorMessage}, 404: {"model": ErrorMessage}})
INTERACTION_ERRORS = error_responses(408, 503)


def record(vm: Vm, browsers: BrowserService) -> BrowserSessionRecord:
    viewport = viewport_of(vm)
    return BrowserSessionRecord(
        session_id=vm.session_id,
        id=vm.session_id,
        vm_id=vm.id,
        status=public_status(vm),
        viewport_width=viewport.width,
        viewport_height=viewport.height,
        user_agent=viewport.user_agent,
        created_at=vm.created_at.isoformat(),
        expires_at=vm.expires_at.isoformat(),
        browser_restarts=browsers.restarts.get(vm.id, 0),
    )


def done(session_id: str, **data: Any) -> dict[str, Any]:
    return {"success": True, "session_id": session_id, **data}


@router.post("/v1/browser/sessions/", responses=error_responses(429, 503))
async def create_browser_session(
    body: BrowserSessionCreate, user: CurrentUser, browsers: Browsers
) -> BrowserSessionRecord:
    vm = await browsers.create(user.id, body.viewport_width, body.viewport_height, body.user_agent)
    return record(vm, browsers)


@router.get("/v1/browser/sessions/")
async def list_browser_sessions(user: CurrentUser, browsers: Browsers) -> BrowserSessionList:
    sessions = [record(vm, browsers) for vm in await browsers.list(user.id)]
    return BrowserSessionList(sessions=sessions, count=len(sessions))


@router.get("/v1/browser/sessions/{session_id}")
async def get_browser_session(session_id: str, user: CurrentUser, browsers: Browsers) -> BrowserSessionRecord:
    return record(await browsers.get(user.id, session_id), browsers)


@router.delete("/v1/browser/sessions/{session_id}")
async def close_browser_session(session_id: str, user: CurrentUser, browsers: Browsers) -> BrowserSessionClosed:
    vm = await browsers.close(user.id, session_id)
    return BrowserSessionClosed(success=True, session_id=session_id, status=vm.status)


@router.post("/v1/browser/interactions/navigate", responses=error_responses(403, 408, 502, 503))
async def navigate(body: NavigateRequest, user: CurrentUser, browsers: Browsers) -> dict[str, Any]:
    page = await browsers.navigate(user.id, body.session_id, body.url, body.wait_timeout)
    return done(body.session_id, **page, data=page)


@router.post("/v1/browser/interactions/click", responses=INTERACTION_ERRORS)
async def click(body: ClickRequest, user: CurrentUser, browsers: Browsers) -> dict[str, Any]:
    await browsers.act(user.id, body.session_id, lambda tab: tab.click(body.selector, body.force, body.timeout))
    return done(body.session_id, selector=body.selector)


@router.post("/v1/browser/interactions/type", responses=INTERACTION_ERRORS)
async def type_text(body: TypeRequest, user: CurrentUser, browsers: Browsers) -> dict[str, Any]:
    await browsers.act(
        user.id, body.session_id, lambda tab: tab.type(body.selector, body.text, body.delay, body.timeout)
    )
    return done(body.session_id, selector=body.selector, typed=len(body.text))


@router.post("/v1/browser/interactions/fill", responses=INTERACTION_ERRORS)
async def fill(body: FillRequest, user: CurrentUser, browsers: Browsers) -> dict[str, Any]:
    await browsers.act(user.id, body.session_id, lambda tab: tab.fill(body.selector, body.value, body.timeout))
    return done(body.session_id, selector=body.selector)


@router.post("/v1/browser/interactions/scroll", responses=INTERACTION_ERRORS)
async def scroll(body: ScrollRequest, user: CurrentUser, browsers: Browsers) -> dict[str, Any]:
    position = await browsers.act(
        user.id, body.session_id, lambda tab: tab.scroll(body.selector, body.x, body.y, body.timeout)
    )
    return done(body.session_id, **position)


@router.post("/v1/browser/interactions/wait", responses=INTERACTION_ERRORS)
async def wait(body: WaitRequest, user: CurrentUser, browsers: Browsers) -> dict[str, Any]:
    await browsers.act(user.id, body.session_id, lambda tab: tab.wait(body.condition, body.selector, body.timeout))
    return done(body.session_id, condition=body.condition, selector=body.selector)


@router.post("/v1/browser/interactions/screenshot", responses=INTERACTION_ERRORS)
async def screenshot(body: ScreenshotRequest, user: CurrentUser, browsers: Browsers) -> dict[str, Any]:
    clip = body.clip.model_dump() if body.clip is not None else None
    image = await browsers.act(
        user.id, body.session_id, lambda tab: tab.screenshot(body.full_page, body.format, clip, body.quality)
    )
    return done(body.session_id, screenshot=image, format=body.format)


@router.post("/v1/browser/interactions/extract", responses=INTERACTION_ERRORS)
async def extract(body: ExtractRequest, user: CurrentUser, browsers: Browsers) -> dict[str, Any]:
    elements = await browsers.act(
        user.id, body.session_id, lambda tab: tab.extract_elements(body.selector, body.attributes)
    )
    return done(body.session_id, elements=elements, count=len(elements))


@router.post("/v1/browser/interactions/content", responses=INTERACTION_ERRORS)
async def content(body: ContentRequest, user: CurrentUser, browsers: Browsers) -> dict[str, Any]:
    page = await browsers.act(
        user.id,
        body.session_id,
        lambda tab: tab.extract_content(body.include_interactive, body.include_anchors, body.max_anchors),
    )
    return done(body.session_id, **page)
