"""What a snapshot build (``POST /v1/snapshots`` on an image variant, with
``build_args``) does: its arguments checked, the shell steps the builder VM
runs, the package-manager mirrors written into the guest, and the builder's
egress policy. Pure functions: nothing here touches a VM.

``build_args`` keys (InstaVM's, as its SDK and ``instavm snapshot build`` send them):

- ``extra_apt_packages``, ``extra_pip_packages``, ``extra_npm_packages``: a list of
  names, or one string of names separated by spaces or commas (the CLI's
  ``--apt "curl jq"``); apt ``name`` or ``name=version``, pip requirement
  specifiers (``name``, ``name==1.0``, ``name[extra]>=2``), npm ``name``,
  ``@scope/name``, ``name@version``. npm needs an image variant that has npm
  (its manifest installs the ``npm`` package); on any other it is a 422.
- ``git_clone_url`` (https, http or git URL) and ``git_clone_branch``: cloned
  into the image's workdir, as the repository's name.
- ``post_build_cmd``: a bash command run last, in the workdir, with ``envs``.
- ``envs``: variables every VM made from the snapshot has (``/etc/environment``).
- ``template_app_cmd`` / ``template_app_cwd``: a command started in the builder
  just before the save, detached; it is running in every VM restored from the
  snapshot (its output goes to ``/var/log/kiln-template-app.log``).

- ``disk_size_gb``: the root disk's size in GiB, grown before the other steps
  (``build_disk``: checked there, as the image's disk and the server's limit say).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any
from urllib.parse import urlsplit

from kiln.config import Settings
from kiln.services.errors import FieldProblem
from kiln.services.vm_policy import ENV_NAME_PATTERN

PACKAGE_KEYS = ("extra_apt_packages", "extra_pip_packages", "extra_npm_packages")
TEXT_KEYS = ("git_clone_url", "git_clone_branch", "post_build_cmd", "template_app_cmd", "template_app_cwd")
BUILD_ARGS = (*PACKAGE_KEYS, *TEXT_KEYS, "envs", "disk_size_gb")
# Where a command name could be taken for an option, or a shell could split it.
PACKAGE_PATTERNS = {
    "extra_apt_packages": re.compile(r"[a-z0-9][a-z0-9+.-]*(=[A-Za-z0-9.+:~-]+)?"),
    "extra_pip_packages": re.compile(
        r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?([<>=!~]=?[A-Za-z0-9.*+!-]+,?)*"
    ),
    "extra_npm_packages": re.compile(r"(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*(@[A-Za-z0-9.^~<>=*+-]+)?"),
}
MAX_PACKAGES = 200
MAX_TEXT = 16 * 1024
APP_LOG = "/var/log/kiln-template-app.log"
# The builder's own files: the pip and npm configuration the mirrors need.
PIP_CONF = "/etc/pip.conf"
NPM_RC = "/etc/npmrc"
APT_SOURCES = "/etc/apt/sources.list"


@dataclass(frozen=True)
class BuildStep:
    title: str
    shell: str


@dataclass(frozen=True)
class BuildPlan:
    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    npm: tuple[str, ...] = ()
    git_url: str | None = None
    git_branch: str | None = None
    post_build_cmd: str | None = None
    envs: dict[str, str] = field(default_factory=dict)
    app_cmd: str | None = None
    app_cwd: str | None = None
    # The root disk's size once grown (build_disk); None: the variant's.
    disk_bytes: int | None = None


def check_build_args(
    args: dict[str, Any], variant_packages: tuple[str, ...], variant: str
) -> tuple[BuildPlan, list[FieldProblem]]:
    """The plan of ``build_args`` and every problem of it (each located at its key)."""
    problems: list[FieldProblem] = []

    def fail(key: str, message: str) -> None:
        problems.append(FieldProblem(("build_args", key), message))

    for key in args:
        if key not in BUILD_ARGS:
            fail(key, f"unknown; a build takes {', '.join(BUILD_ARGS)}")
    packages: dict[str, tuple[str, ...]] = {}
    for key in PACKAGE_KEYS:
        names = _names(args.get(key))
        if names is None:
            fail(key, "must be a list of package names, or one string of them")
            continue
        bad = [name for name in names if not PACKAGE_PATTERNS[key].fullmatch(name)]
        if bad:
            fail(key, f"not a package name: {', '.join(repr(name) for name in bad[:5])}")
        if len(names) > MAX_PACKAGES:
            fail(key, f"at most {MAX_PACKAGES} packages")
        packages[key] = names
    if packages.get("extra_npm_packages") and "npm" not in variant_packages:
        fail(
            "extra_npm_packages",
            f"image variant {variant!r} has no npm; build on a variant whose image installs npm",
        )
    text: dict[str, str | None] = {}
    for key in TEXT_KEYS:
        value = args.get(key)
        unusable = not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT or "\0" in value
        if value is not None and unusable:
            fail(key, f"must be a non-empty string of at most {MAX_TEXT} characters")
            value = None
        text[key] = value
    url = text["git_clone_url"]
    if url is not None and (urlsplit(url).scheme not in ("https", "http", "git") or not urlsplit(url).hostname):
        fail("git_clone_url", "must be an https, http or git URL")
    if text["git_clone_branch"] is not None:
        if url is None:
            fail("git_clone_branch", "needs git_clone_url")
        elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", text["git_clone_branch"]):
            fail("git_clone_branch", "not a branch name")
    cwd = text["template_app_cwd"]
    if cwd is not None:
        if text["template_app_cmd"] is None:
            fail("template_app_cwd", "needs template_app_cmd")
        elif not cwd.startswith("/"):
            fail("template_app_cwd", "must be an absolute path")
    envs = args.get("envs") or {}
    if not isinstance(envs, dict) or not all(
        isinstance(k, str) and ENV_NAME_PATTERN.fullmatch(k) and isinstance(v, str) and "\0" not in v
        for k, v in envs.items()
    ):
        fail("envs", "must map variable names to strings")
        envs = {}
    plan = BuildPlan(
        apt=packages.get("extra_apt_packages", ()),
        pip=packages.get("extra_pip_packages", ()),
        npm=packages.get("extra_npm_packages", ()),
        git_url=url,
        git_branch=text["git_clone_branch"],
        post_build_cmd=text["post_build_cmd"],
        envs=dict(envs),
        app_cmd=text["template_app_cmd"],
        app_cwd=cwd,
    )
    return plan, problems


def _names(value: object) -> tuple[str, ...] | None:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part for part in re.split(r"[\s,]+", value) if part)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(item.strip() for item in value if item.strip())
    return None


def steps(plan: BuildPlan, settings: Settings) -> list[BuildStep]:
    """The builder's shell steps, in order (each run by ``/bin/sh -c`` as root)."""
    made: list[BuildStep] = []
    q = shlex.quote
    if plan.apt:
        if settings.apt_mirror:
            options = "[trusted=yes] " if settings.apt_mirror_trusted else ""
            line = f"deb {options}{settings.apt_mirror} {settings.apt_mirror_dist}\n"
            made.append(BuildStep(
                f"apt sources: {settings.apt_mirror}",
                f"rm -f /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources && "
                f"printf %s {q(line)} > {APT_SOURCES}",
            ))  # fmt: skip
        made.append(BuildStep("apt-get update", "apt-get update"))
        made.append(BuildStep(
            f"apt-get install {' '.join(plan.apt)}",
            "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends -- "
            + " ".join(q(name) for name in plan.apt)
            + " && apt-get clean",
        ))  # fmt: skip
    if plan.pip:
        if settings.pip_index_url:
            conf = f"[global]\nindex-url = {settings.pip_index_url}\n"
            host = urlsplit(settings.pip_index_url).hostname
            if urlsplit(settings.pip_index_url).scheme == "http" and host:
                conf += f"trusted-host = {host}\n"
            made.append(BuildStep(f"pip index: {settings.pip_index_url}", f"printf %s {q(conf)} > {PIP_CONF}"))
        made.append(BuildStep(
            f"pip install {' '.join(plan.pip)}",
            # Debian marks its Python externally managed; the build owns this image.
            "python3 -m pip install --no-cache-dir --break-system-packages --root-user-action=ignore -- "
            + " ".join(q(name) for name in plan.pip),
        ))  # fmt: skip
    if plan.npm:
        registry = f" --registry={q(settings.npm_registry)}" if settings.npm_registry else ""
        if settings.npm_registry:
            npmrc = f"registry={settings.npm_registry}\n"
            made.append(BuildStep(f"npm registry: {settings.npm_registry}", f"printf %s {q(npmrc)} > {NPM_RC}"))
        made.append(BuildStep(
            f"npm install -g {' '.join(plan.npm)}",
            f"npm install -g --no-audit --no-fund{registry} -- " + " ".join(q(name) for name in plan.npm),
        ))  # fmt: skip
    if plan.git_url:
        branch = f" --branch {q(plan.git_branch)}" if plan.git_branch else ""
        name = repository_name(plan.git_url)
        made.append(BuildStep(
            f"git clone {plan.git_url}", f"git clone{branch} -- {q(plan.git_url)} {q(name)}"
        ))  # fmt: skip
    if plan.post_build_cmd:
        made.append(BuildStep("post_build_cmd", f"exec /bin/bash -c {q(plan.post_build_cmd)}"))
    if plan.app_cmd:
        cd = f"cd {q(plan.app_cwd)} && " if plan.app_cwd else ""
        made.append(BuildStep(
            "template_app_cmd (started, detached)",
            f"{cd}setsid nohup /bin/bash -c {q(plan.app_cmd)} > {APP_LOG} 2>&1 < /dev/null &",
        ))  # fmt: skip
    return made


def repository_name(url: str) -> str:
    """The directory a clone of ``url`` goes into (as ``git clone`` names it)."""
    last = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    return last if re.fullmatch(r"[A-Za-z0-9._-]+", last) and last not in (".", "..") else "repository"


def egress_policy(plan: BuildPlan, settings: Settings) -> dict[str, Any] | None:
    """What the builder VM may reach: the mirror of each package manager the
    build uses (the package-manager group for one without a mirror), and the
    host of ``git_clone_url``. None: the build needs no network."""
    hosts: list[str] = []
    group = False
    for used, mirror in ((plan.apt, settings.apt_mirror), (plan.pip, settings.pip_index_url),
                         (plan.npm, settings.npm_registry)):  # fmt: skip
        if not used:
            continue
        host = urlsplit(mirror).hostname if mirror else None
        if host:
            hosts.append(host)
        else:
            group = True
    if plan.git_url and urlsplit(plan.git_url).hostname:
        hosts.append(urlsplit(plan.git_url).hostname or "")
    if not hosts and not group:
        return None
    cidrs = [f"{host}/32" for host in hosts if _is_address(host)]
    domains = list(dict.fromkeys(host for host in hosts if not _is_address(host)))
    policy: dict[str, Any] = {"allow_package_managers": group, "allowed_cidrs": cidrs}
    if domains:
        policy.update(allowed_domains=domains, allow_http=True, allow_https=True)
    return policy


def _is_address(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True
