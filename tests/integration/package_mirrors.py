"""Tiny package mirrors a test builds and the outside world's ``mirror.test``
serves (``OutsideWorld.mirror_root``): a flat apt repository with one .deb
(dpkg-deb, indexed by dpkg-scanpackages, unsigned: ``[trusted=yes]``), a PEP 503
simple index with one wheel, and an npm registry with one package.

Each package puts a file that says which manager installed it, so a test can
check a VM for all three.
"""

from __future__ import annotations

import base64
import email.utils
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

APT_PACKAGE = "kiln-apt-probe"
APT_FILE = "/usr/share/kiln-apt-probe/installed"
PIP_PACKAGE = "kiln-pip-probe"
PIP_MODULE = "kiln_pip_probe"
NPM_PACKAGE = "kiln-npm-probe"
VERSION = "1.0.0"


GIT_REPOSITORY = "git/app.git"  # under the root; its one file:
GIT_FILE = "README"


def build_all(root: Path, base_url: str) -> dict[str, str]:
    """The three mirrors under ``root`` (served as ``base_url``), and a git
    repository; the server settings that point a build at the mirrors."""
    build_git_repository(root / GIT_REPOSITORY)
    build_apt_repository(root / "apt")
    build_pip_index(root / "pip")
    build_npm_registry(root / "npm", f"{base_url}/npm")
    return {
        "KILN_APT_MIRROR": f"{base_url}/apt",
        "KILN_APT_MIRROR_DIST": "./",
        "KILN_APT_MIRROR_TRUSTED": "true",
        "KILN_PIP_INDEX_URL": f"{base_url}/pip/simple/",
        "KILN_NPM_REGISTRY": f"{base_url}/npm/",
    }


def build_git_repository(bare: Path) -> None:
    """A bare repository with one commit on ``main``, cloneable over dumb HTTP."""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / GIT_FILE).write_text("cloned by the build\n")
        git = ["git", "-c", "user.name=kiln", "-c", "user.email=tests@kiln.invalid", "-C", str(work)]
        for command in (["init", "-q", "-b", "main"], ["add", GIT_FILE], ["commit", "-q", "-m", "one file"]):
            subprocess.run([*git, *command], check=True, capture_output=True)
        bare.parent.mkdir(parents=True)
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, capture_output=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True, capture_output=True)


def build_apt_repository(directory: Path) -> None:
    directory.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / APT_PACKAGE
        (tree / "DEBIAN").mkdir(parents=True)
        (tree / "DEBIAN" / "control").write_text(
            f"Package: {APT_PACKAGE}\nVersion: {VERSION}\nArchitecture: all\n"
            "Maintainer: Kiln tests <tests@kiln.invalid>\nDescription: a package the build tests install\n"
        )
        installed = tree / APT_FILE.lstrip("/")
        installed.parent.mkdir(parents=True)
        installed.write_text("installed by apt\n")
        deb = directory / f"{APT_PACKAGE}_{VERSION}_all.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True,
                       capture_output=True)  # fmt: skip
    index = subprocess.run(
        ["dpkg-scanpackages", "--multiversion", "."], cwd=directory, check=True, capture_output=True
    ).stdout
    (directory / "Packages").write_bytes(index)
    packed = gzip.compress(index, mtime=0)
    (directory / "Packages.gz").write_bytes(packed)
    date = email.utils.formatdate(usegmt=True)
    release = f"Origin: kiln-tests\nLabel: kiln-tests\nDate: {date}\nSHA256:\n" + "".join(
        f" {hashlib.sha256(data).hexdigest()} {len(data)} {name}\n"
        for name, data in (("Packages", index), ("Packages.gz", packed))
    )
    (directory / "Release").write_text(release)


def build_pip_index(directory: Path) -> None:
    files = {
        f"{PIP_MODULE}/__init__.py": b'INSTALLED_BY = "pip"\n',
        f"{PIP_MODULE}-{VERSION}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {PIP_PACKAGE}\nVersion: {VERSION}\n".encode()
        ),
        f"{PIP_MODULE}-{VERSION}.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: kiln-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record_name = f"{PIP_MODULE}-{VERSION}.dist-info/RECORD"
    record = "".join(f"{name},sha256={_urlsafe_digest(data)},{len(data)}\n" for name, data in files.items())
    record += f"{record_name},,\n"
    wheel_name = f"{PIP_MODULE}-{VERSION}-py3-none-any.whl"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(record_name, record)
    data = buffer.getvalue()
    (directory / "files").mkdir(parents=True)
    (directory / "files" / wheel_name).write_bytes(data)
    project = directory / "simple" / PIP_PACKAGE
    project.mkdir(parents=True)
    digest = hashlib.sha256(data).hexdigest()
    (project / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="../../files/{wheel_name}#sha256={digest}">{wheel_name}</a>'
        "</body></html>\n"
    )
    (directory / "simple" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{PIP_PACKAGE}/">{PIP_PACKAGE}</a></body></html>\n'
    )


def build_npm_registry(directory: Path, base_url: str) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in (
            ("package/package.json", json.dumps({"name": NPM_PACKAGE, "version": VERSION, "main": "index.js"})),
            ("package/index.js", 'module.exports = "installed by npm";\n'),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    tarball = buffer.getvalue()
    (directory / "tarballs").mkdir(parents=True)
    tarball_name = f"{NPM_PACKAGE}-{VERSION}.tgz"
    (directory / "tarballs" / tarball_name).write_bytes(tarball)
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    version = {
        "name": NPM_PACKAGE,
        "version": VERSION,
        "main": "index.js",
        "dist": {
            "tarball": f"{base_url}/tarballs/{tarball_name}",
            "shasum": hashlib.sha1(tarball).hexdigest(),  # noqa: S324 - npm's own field
            "integrity": integrity,
        },
    }
    metadata = {"name": NPM_PACKAGE, "dist-tags": {"latest": VERSION}, "versions": {VERSION: version}}
    (directory / NPM_PACKAGE).write_text(json.dumps(metadata))


def _urlsafe_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
