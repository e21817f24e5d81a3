"""trust_ca: make every common client in the guest trust a CA certificate (the
egress proxy's, which re-signs the TLS of the services a vault injects into).

The certificate goes into the system bundle (created when the image has none)
and, for ``update-ca-certificates`` to keep it, into the local CA directory.
Clients that do not read the system bundle by default are pointed at it through
the environment (Python requests and certifi, Node, curl, pip), set the way
``set_env`` sets variables: for every later exec, terminal and new python
session, and in /etc/environment."""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from typing import Any

from .args import arg
from .config import AgentConfig
from .env import Environment
from .errors import AgentError
from .files import write_atomically
from .wire import Emit, Handler

# Debian's bundle; other distributions' bundles are updated too when they exist.
SYSTEM_BUNDLE = "ssl/certs/ca-certificates.crt"  # under etc_dir
OTHER_BUNDLES = ("pki/tls/certs/ca-bundle.crt", "ssl/cert.pem")
TRUST_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "PIP_CERT")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)
MAX_PEM_CHARS = 64 * 1024


class Trust:
    def __init__(self, config: AgentConfig, env: Environment) -> None:
        self.config = config
        self.env = env
        self.lock = threading.Lock()  # bundles are read, changed and replaced

    def handlers(self) -> dict[str, Handler]:
        return {"trust_ca": self.op_trust_ca}

    def op_trust_ca(self, args: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """{"pem", "name"} -> {"bundle", "certificate", "variables"}

        Idempotent: the bundle holds each name's certificates once (a new PEM for
        a name replaces the old one)."""
        name = arg(args, "name", str)
        if not NAME_PATTERN.fullmatch(name):
            raise AgentError("EINVAL", "name must be 1-64 letters, digits, '.', '_' or '-'")
        certificates = canonical_certificates(arg(args, "pem", str))
        block = "".join(certificates)
        with self.lock:
            local_dir = self.config.local_ca_dir
            os.makedirs(local_dir, mode=0o755, exist_ok=True)
            certificate = os.path.join(local_dir, f"{name}.crt")
            write_atomically(certificate, block)
            bundle = os.path.join(self.config.etc_dir, SYSTEM_BUNDLE)
            os.makedirs(os.path.dirname(bundle), mode=0o755, exist_ok=True)
            for path in (bundle, *(os.path.join(self.config.etc_dir, other) for other in OTHER_BUNDLES)):
                if path == bundle or os.path.exists(path):
                    add_to_bundle(path, name, block)
        variables = {variable: bundle for variable in TRUST_VARIABLES}
        self.env.update(variables)
        return {"bundle": bundle, "certificate": certificate, "variables": sorted(variables)}


def canonical_certificates(pem: str) -> list[str]:
    """The PEM's certificates, each re-wrapped in 64-column base64; EINVAL for
    text that holds none or a block that is not base64 DER."""
    if len(pem) > MAX_PEM_CHARS:
        raise AgentError("EINVAL", f"pem is longer than {MAX_PEM_CHARS} characters")
    blocks = PEM_BLOCK.findall(pem)
    if not blocks:
        raise AgentError("EINVAL", "pem holds no -----BEGIN CERTIFICATE----- block")
    certificates = []
    for body in blocks:
        try:
            der = base64.b64decode("".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise AgentError("EINVAL", "a certificate in pem is not base64") from None
        if not der or der[0] != 0x30:  # a DER certificate is an ASN.1 SEQUENCE
            raise AgentError("EINVAL", "a certificate in pem is not DER")
        text = base64.b64encode(der).decode("ascii")
        lines = [text[start : start + 64] for start in range(0, len(text), 64)]
        certificates.append(
            "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"
        )
    return certificates


def add_to_bundle(path: str, name: str, block: str) -> None:
    """Put ``block`` into the bundle at ``path`` between markers naming it,
    replacing what an earlier call put there under that name. TLS libraries skip
    text outside BEGIN/END lines, so the markers are harmless to them."""
    begin, end = f"# kiln trust_ca {name}: begin\n", f"# kiln trust_ca {name}: end\n"
    real = os.path.realpath(path)  # a bundle that is a symlink is changed where it lives
    try:
        with open(real, encoding="utf-8", errors="surrogateescape") as current_file:
            current = current_file.read()
    except FileNotFoundError:
        current = ""
    kept = current
    start = current.find(begin)
    if start != -1:
        stop = current.find(end, start)
        kept = current[:start] + (current[stop + len(end) :] if stop != -1 else "")
    if kept and not kept.endswith("\n"):
        kept += "\n"
    wanted = kept + begin + block + end
    if wanted != current:
        write_atomically(real, wanted.encode("utf-8", "surrogateescape"))
