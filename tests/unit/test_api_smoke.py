from unit.harness import AppRunner


async def test_health_needs_no_auth_and_says_what_the_host_gives_vms(run_app: AppRunner) -> None:
    async with run_app() as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "ok"
    # The service tests' settings: no networking (the details say so, and why), no confinement.
    assert health["networking"] == {
        "mode": "off",
        "reason": "guest networking is turned off (KILN_NETWORKING=off)",
    }
    assert health["confinement"] is None
    assert health["accelerator"] == "tcg"
    assert health["disk"]["free_bytes"] > 0
