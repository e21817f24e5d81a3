"""Registry references, and pulling one into a layout with ``skopeo``.

``parse_reference`` reads ``python:3.12``, ``ghcr.io/o/r@sha256:...`` and the
like. ``pull`` reaches checked public addresses only (``kiln.runtime.registry``:
a pinning CONNECT proxy) and runs skopeo with none of the operator's registry
configuration or credentials. Without skopeo, or without network, it fails
within a bounded time with a reason that says so.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from kiln.runtime import registry
from kiln.runtime.oci.layout import PLATFORM, RegistryError

REFERENCE_PATTERN = re.compile(
    r"(?:(?P<domain>(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9-]+)*(?::[0-9]+)?)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] that answers the distribution API
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        name = f"{self.registry}/{self.repository}"
        if self.tag:
            name += f":{self.tag}"
        if self.digest:
            name += f"@{self.digest}"
        return name


def parse_reference(text: str) -> Reference | None:
    """A registry reference (``python:3.12``, ``docker.io/library/python:3.12``,
    ``ghcr.io/o/r@sha256:...``), or None if ``text`` is not one."""
    match = REFERENCE_PATTERN.fullmatch(text)
    if match is None:
        return None
    domain, path = match.group("domain"), match.group("path")
    if domain is not None and not ("." in domain or ":" in domain or domain == "localhost"):
        # "library/python": the first part is a repository namespace, not a host.
        path, domain = f"{domain}/{path}", None
        if not re.fullmatch(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", text.split("/")[0]):
            return None
    registry = domain or DOCKER_HUB
    if registry == DOCKER_HUB:
        registry = DOCKER_HUB_API
        if "/" not in path:
            path = f"library/{path}"
    tag = match.group("tag")
    digest = match.group("digest")
    return Reference(registry, path, tag if tag or digest else "latest", digest)


ANONYMOUS_POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}'
PULL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


async def pull(
    reference: Reference,
    layout: Path,
    timeout: float,
    connect_timeout: float = 10.0,
    resolver: registry.Resolver = registry.system_resolver,
    allow: registry.AddressCheck = registry.is_public,
) -> None:
    """Copy the image into a new OCI layout at ``layout`` (best inside a
    ``private_dir``) with skopeo, within ``timeout`` seconds; RegistryError
    (saying why) otherwise. Whether the registry answers at all is known within
    ``connect_timeout``.

    The pull reaches public addresses only, through a ``registry.PinnedProxy``,
    and runs with none of the operator's registry configuration: no credentials
    (``--src-no-creds``, an empty auth file, a HOME of its own), no client
    certificates, no mirrors or insecure registries (an empty registries.conf)."""
    host, _, port_text = reference.registry.partition(":")
    port = int(port_text or 443)
    try:
        reader_writer = await registry.open_checked(host, port, connect_timeout, resolver, allow)
    except registry.AddressRefused as error:
        raise RegistryError(f"cannot pull {reference}: {error}") from None
    except OSError as error:  # TimeoutError included
        reason = "timed out" if isinstance(error, TimeoutError) else str(error) or type(error).__name__
        raise RegistryError(
            f"cannot pull {reference}: the registry {reference.registry} is unreachable from this "
            f"server ({reason}); import a local OCI image layout directory instead"
        ) from None
    reader_writer[1].close()
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise RegistryError(
            f"cannot pull {reference}: this server has no registry client (skopeo); "
            f"copy the image into an OCI layout (skopeo copy docker://... oci:DIR) and import DIR"
        )
    scratch = layout.with_name(layout.name + ".skopeo")
    async with registry.PinnedProxy({443, port}, connect_timeout, resolver, allow) as proxy:
        argv, env = skopeo_command(skopeo, reference, layout, scratch, await proxy.start())
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RegistryError(f"cannot pull {reference}: no answer within {timeout:g}s") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if process.returncode != 0:
        if proxy.refusals:
            raise RegistryError(f"cannot pull {reference}: refused {proxy.refusals[0]}")
        tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RegistryError(f"cannot pull {reference}: {' '.join(tail) or 'skopeo failed'}")


def skopeo_command(
    skopeo: str, reference: Reference, layout: Path, scratch: Path, proxy_url: str
) -> tuple[list[str], dict[str, str]]:
    """skopeo's argv and whole environment for an anonymous pull through the
    proxy, with its configuration files made empty in ``scratch`` (0700)."""
    scratch.mkdir(mode=0o700)
    for name in ("home", "certs", "registries.d", "tmp", "run"):
        (scratch / name).mkdir(mode=0o700)
    (scratch / "auth.json").write_text("{}")
    (scratch / "registries.conf").write_text("")
    (scratch / "policy.json").write_text(ANONYMOUS_POLICY)
    argv = [
        skopeo,
        "--policy", str(scratch / "policy.json"),
        "--registries.d", str(scratch / "registries.d"),
        "--tmpdir", str(scratch / "tmp"),
        "--override-os", PLATFORM[0], "--override-arch", PLATFORM[1],
        "copy",
        "--src-no-creds",
        "--src-authfile", str(scratch / "auth.json"),
        "--src-cert-dir", str(scratch / "certs"),
        "--src-tls-verify=true",
        f"docker://{reference}", f"oci:{layout}:image",
    ]  # fmt: skip
    # The whole environment: nothing of the server's (its proxies, its HOME with
    # ~/.docker/config.json, REGISTRY_AUTH_FILE) reaches the pull.
    env = {
        "PATH": PULL_PATH,
        "HOME": str(scratch / "home"),
        "XDG_RUNTIME_DIR": str(scratch / "run"),
        "XDG_CONFIG_HOME": str(scratch / "home"),
        "DOCKER_CONFIG": str(scratch / "home"),
        "REGISTRY_AUTH_FILE": str(scratch / "auth.json"),
        "CONTAINERS_REGISTRIES_CONF": str(scratch / "registries.conf"),
        "HTTPS_PROXY": proxy_url,
        "https_proxy": proxy_url,
        "HTTP_PROXY": proxy_url,
        "http_proxy": proxy_url,
        "NO_PROXY": "",
        "no_proxy": "",
    }
    return argv, env
