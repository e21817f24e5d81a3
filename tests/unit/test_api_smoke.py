from unit.harness import AppRunner


async def test_health_needs_no_auth(run_app: AppRunner) -> None:
    async with run_app() as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    # These tests run with KILN_NETWORKING=off: the details say so, and why.
    assert response.json() == {
        "status": "ok",
        "networking": "off",
        "networking_reason": "guest networking is turned off (KILN_NETWORKING=off)",
    }
