"""Registry pulls reach checked public addresses only (kiln.runtime.registry),
through the pinning proxy, with none of the operator's credentials."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from kiln.runtime import oci, registry


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.8.9.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
     "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "192.0.2.1",
     "::1", "::", "fe80::1", "fc00::1", "fd12::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
     "ff02::1", "not an address"],
)  # fmt: skip
def test_addresses_a_pull_never_reaches(address: str) -> None:
    assert not registry.is_public(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "140.82.112.3", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses(address: str) -> None:
    assert registry.is_public(address)


async def test_one_private_answer_taints_the_name() -> None:
    async def mixed(host: str, port: int) -> list[str]:
        return ["8.8.8.8", "10.0.0.5"]

    with pytest.raises(registry.AddressRefused, match="10.0.0.5"):
        await registry.checked_addresses("registry.test", 443, mixed)


class Upstream:
    """A TCP server that echoes, counting connections."""

    def __init__(self) -> None:
        self.connections = 0

    async def start(self) -> int:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(echo, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]


async def ask(proxy_url: str, request: bytes) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(proxy_url.rpartition(":")[2])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    return await reader.readuntil(b"\r\n\r\n"), reader, writer


async def test_the_proxy_tunnels_to_the_address_it_checked() -> None:
    upstream = Upstream()
    port = await upstream.start()
    asked: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]  # "registry.test" resolves nowhere else: only this can reach it

    async with registry.PinnedProxy({port}, resolver=resolver, allow=lambda a: True) as proxy:
        url = await proxy.start()
        head, reader, writer = await ask(url, f"CONNECT registry.test:{port} HTTP/1.1\r\n\r\n".encode())
        assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"through the tunnel")
        await writer.drain()
        assert await reader.readexactly(18) == b"through the tunnel"
        writer.close()
    assert asked == ["registry.test"] and upstream.connections == 1
    upstream.server.close()


async def test_the_proxy_refuses_private_addresses_other_ports_and_plain_requests() -> None:
    upstream = Upstream()
    port = await upstream.start()

    async def loopback(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    async with registry.PinnedProxy({port}, resolver=loopback) as proxy:
        url = await proxy.start()
        for request, status in (
            (f"CONNECT registry.test:{port} HTTP/1.1\r\n\r\n", b"403"),  # resolves to loopback
            ("CONNECT registry.test:22 HTTP/1.1\r\n\r\n", b"403"),  # not a registry port
            ("GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\n\r\n", b"405"),
        ):
            head, _, writer = await ask(url, request.encode())
            assert head.split(b" ")[1] == status, request
            writer.close()
        assert len(proxy.refusals) == 2 and "127.0.0.1" in proxy.refusals[0]
    assert upstream.connections == 0
    upstream.server.close()


def test_skopeo_gets_no_credentials_and_none_of_the_servers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_FILE", "/root/.secret-auth.json")
    monkeypatch.setenv("HTTPS_PROXY", "http://operator-proxy:3128")
    reference = oci.Reference("ghcr.io", "o/r", "v1", None)
    argv, env = oci.skopeo_command("skopeo", reference, tmp_path / "layout", tmp_path / "scratch",
                                    "http://127.0.0.1:1")  # fmt: skip
    assert "--src-no-creds" in argv and "--src-tls-verify=true" in argv
    for option in ("--src-authfile", "--src-cert-dir", "--policy", "--registries.d"):
        assert str(tmp_path / "scratch") in argv[argv.index(option) + 1]
    assert (tmp_path / "scratch" / "auth.json").read_text() == "{}"
    assert (tmp_path / "scratch" / "registries.conf").read_text() == ""
    assert list((tmp_path / "scratch" / "certs").iterdir()) == []
    assert env["REGISTRY_AUTH_FILE"] == str(tmp_path / "scratch" / "auth.json")
    assert env["HTTPS_PROXY"] == env["HTTP_PROXY"] == "http://127.0.0.1:1" and env["NO_PROXY"] == ""
    assert not [value for value in env.values() if "secret-auth" in value or "operator-proxy" in value]
    assert (tmp_path / "scratch").stat().st_mode & 0o777 == 0o700


async def test_a_real_skopeo_pull_goes_through_the_proxy(tmp_path: Path) -> None:
    """skopeo reaches "registry.test" (a name no DNS knows) only through the
    proxy's checked address: the fake upstream sees it, then TLS fails there."""
    if shutil.which("skopeo") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("skopeo is not installed (scripts/setup.sh installs it)")
        pytest.skip("skopeo is not installed")
    upstream = Upstream()
    port = await upstream.start()

    async def resolver(host: str, port: int) -> list[str]:
        assert host == "registry.test"
        return ["127.0.0.1"]

    reference = oci.Reference(f"registry.test:{port}", "library/img", "1", None)
    private = oci.private_dir(tmp_path)
    with pytest.raises(oci.RegistryError, match="cannot pull registry.test"):
        await oci.pull(reference, private / "layout", timeout=60, connect_timeout=5,
                       resolver=resolver, allow=lambda a: True)  # fmt: skip
    # One probe by pull itself, then skopeo's connections through the tunnel.
    assert upstream.connections >= 2
    assert not (private / "layout.skopeo").exists()
    upstream.server.close()
