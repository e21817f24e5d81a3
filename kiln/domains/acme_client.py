"""ACME (RFC 8555) DNS-01 issuance with certbot's ``acme`` library.

Blocking calls (``requests`` underneath): the service runs each method in a
worker thread, one short HTTP exchange or a few at a time, so that a stop never
waits long for a thread. One account per ACME directory, made on first use and
kept in ``$KILN_DATA_DIR/domains/acme/<directory digest>.json`` (0600: its
private key). An order is kept as JSON (``OrderResource``: URLs, the challenge
tokens, the CSR; no secret) so that a ``manual`` domain's challenge survives
until the user has published it, and a restart.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import josepy
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives.asymmetric import ec

from kiln.crypto.files import create_exclusively
from kiln.domains.errors import AcmeError

USER_AGENT = "kiln-custom-domains"
# One ACME request may take this long; a finalization poll this long per call.
REQUEST_SECONDS = 10
POLL_SECONDS = 3


@dataclass(frozen=True)
class Order:
    """An order for one domain, as stored; ``challenge`` is the DNS-01 TXT value
    still to be validated (None when the authorization is valid already)."""

    resource: dict[str, Any]
    challenge: str | None


class AcmeClient:
    def __init__(self, directory_url: str, state_dir: Path, *, ca_bundle: str = "", email: str = "") -> None:
        self.directory_url = directory_url
        digest = hashlib.sha256(directory_url.encode()).hexdigest()[:16]
        self._account_file = state_dir / f"{digest}.json"
        self._ca_bundle = ca_bundle
        self._email = email
        self._lock = threading.Lock()
        self._client: client.ClientV2 | None = None

    # -- the steps (each blocking; called in a worker thread)

    def new_order(self, domain: str, key_pem: bytes) -> Order:
        with self._lock:
            acme = self._connected()
            csr = crypto_util.make_csr(key_pem, [domain])
            order = self._call("create an order", acme.new_order, csr)
            return Order(order.to_json(), self._challenge_value(acme, order))

    def answer(self, order: Order) -> None:
        """Tell the ACME server the DNS-01 records are in place."""
        with self._lock:
            acme = self._connected()
            resource = messages.OrderResource.from_json(order.resource)
            for authorization in resource.authorizations:
                fresh, _ = self._call("read the authorization", acme.poll, authorization)
                if fresh.body.status != messages.STATUS_PENDING:
                    continue
                challenge = _dns01(fresh)
                self._call("answer the challenge", acme.answer_challenge, challenge, challenge.response(acme.net.key))

    def authorizations(self, order: Order) -> tuple[str, str | None]:
        """``pending`` while the server validates (or waits for an answer),
        ``valid``, or ``invalid`` (failed, expired, deactivated) with why."""
        with self._lock:
            acme = self._connected()
            resource = messages.OrderResource.from_json(order.resource)
            expires = resource.body.expires
            if expires is not None and expires <= datetime.datetime.now(datetime.UTC):
                return "invalid", "the order expired"
            states = [
                self._call("read the authorization", acme.poll, authorization)[0]
                for authorization in resource.authorizations
            ]
            statuses = {state.body.status.name for state in states}
            if statuses - {"pending", "valid"}:
                return "invalid", self._failure(acme, resource) or f"the authorization is {', '.join(sorted(statuses))}"
            if "pending" in statuses:
                return "pending", None
            return "valid", None

    def finalize(self, order: Order) -> str | None:
        """Ask for the certificate (again, harmlessly, if asked already) and poll
        for it briefly: the full chain PEM once issued, else None (call again)."""
        with self._lock:
            acme = self._connected()
            resource = messages.OrderResource.from_json(order.resource)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=POLL_SECONDS)
            try:
                finished = acme.finalize_order(resource, deadline)
            except errors.TimeoutError:
                return None
            except messages.Error as error:
                raise AcmeError(f"the ACME server refused to issue the certificate: {_problem(error)}") from error
            except errors.IssuanceError as error:
                raise AcmeError(f"the ACME server did not issue the certificate: {_problem(error.error)}") from error
            except (errors.Error, requests.RequestException, ValueError) as error:
                raise AcmeError(f"could not finalize the order at {self.directory_url}: {error}") from error
            return str(finished.fullchain_pem) if finished.fullchain_pem else None

    # -- internals

    def _connected(self) -> client.ClientV2:
        if self._client is not None:
            return self._client
        key = self._account_key()
        network = client.ClientNetwork(
            key,
            alg=josepy.ES256,
            verify_ssl=self._ca_bundle or True,  # type: ignore[arg-type]  # requests takes a bundle path too
            user_agent=USER_AGENT,
            timeout=REQUEST_SECONDS,
        )
        try:
            directory = client.ClientV2.get_directory(self.directory_url, network)
        except (errors.Error, requests.RequestException, ValueError) as error:
            raise AcmeError(f"cannot read the ACME directory {self.directory_url}: {error}") from error
        acme = client.ClientV2(directory, network)
        account = json.loads(self._account_file.read_text())
        if account.get("uri"):
            network.account = messages.RegistrationResource(uri=account["uri"], body=messages.Registration())
        else:
            registration = messages.NewRegistration.from_data(email=self._email or None, terms_of_service_agreed=True)
            try:
                network.account = self._call("register an account", acme.new_account, registration)
            except AcmeError as error:
                conflict = error.__cause__
                if not isinstance(conflict, errors.ConflictError):
                    raise
                # The key has an account already (a file written before its URI was).
                network.account = messages.RegistrationResource(uri=conflict.location, body=messages.Registration())
            account["uri"] = network.account.uri
            _rewrite(self._account_file, json.dumps(account))
        self._client = acme
        return acme

    def _account_key(self) -> josepy.JWKEC:
        if not self._account_file.exists():
            fresh = josepy.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
            self._account_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            create_exclusively(
                self._account_file,
                json.dumps({"directory": self.directory_url, "key": fresh.to_json(), "uri": None}),
            )
        stored = json.loads(self._account_file.read_text())
        key = josepy.JWK.from_json(stored["key"])
        if not isinstance(key, josepy.JWKEC):
            raise AcmeError(f"the ACME account key in {self._account_file} is not an EC key")
        return key

    def _challenge_value(self, acme: client.ClientV2, order: messages.OrderResource) -> str | None:
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_PENDING:
                return str(_dns01(authorization).validation(acme.net.key))
        return None

    def _failure(self, acme: client.ClientV2, order: messages.OrderResource) -> str | None:
        for authorization in order.authorizations:
            try:
                fresh, _ = acme.poll(authorization)
            except (errors.Error, messages.Error, requests.RequestException):
                continue
            for challenge in fresh.body.challenges:
                if challenge.error is not None:
                    return _problem(challenge.error)
        return None

    def _call(self, what: str, function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except messages.Error as error:
            raise AcmeError(f"the ACME server refused to {what}: {_problem(error)}") from error
        except (errors.Error, requests.RequestException, ValueError, josepy.errors.Error) as error:
            raise AcmeError(f"could not {what} at {self.directory_url}: {error or type(error).__name__}") from error


def _dns01(authorization: messages.AuthorizationResource) -> messages.ChallengeBody:
    for challenge in authorization.body.challenges:
        if isinstance(challenge.chall, challenges.DNS01):
            return challenge
    raise AcmeError(f"the ACME server offers no dns-01 challenge for {authorization.body.identifier.value}")


def _problem(error: messages.Error | None) -> str:
    if error is None:
        return "no reason given"
    kind = (error.typ or "").rsplit(":", 1)[-1]
    return f"{error.detail or error.title or 'no detail'} ({kind})" if kind else str(error.detail or error)


def _rewrite(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.new")
    partial.unlink(missing_ok=True)
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text)
    partial.replace(path)
