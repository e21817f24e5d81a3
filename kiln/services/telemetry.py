"""What services report for the operator's metrics, without knowing how they are kept.

Services call a ``Telemetry`` (the API layer's one exports Prometheus
metrics, ``kiln.api.metrics``); the default does nothing, so a service built
without one (the CLI, unit tests) needs no metrics library.
"""

from __future__ import annotations

from typing import Protocol


class Telemetry(Protocol):
    def vm_create_finished(self, path: str, seconds: float, ok: bool) -> None:
        """A waited create ended; ``path`` is ``pool``, ``restore`` or ``cold``."""

    def admission_refused(self, kind: str) -> None:
        """A create refused by a quota (``quota``) or the host's limits (``capacity``)."""

    def exec_finished(self, language: str, seconds: float) -> None:
        """A run of ``/execute`` ended (streamed runs are not counted yet)."""

    def webhook_outcome(self, outcome: str) -> None:
        """A delivery attempt ended: ``succeeded``, ``retried`` or ``failed``."""

    def agent_error(self, kind: str) -> None:
        """A guest agent failed a call: ``unreachable``, ``timeout``, ``internal`` or ``outdated``."""


class NoTelemetry:
    def vm_create_finished(self, path: str, seconds: float, ok: bool) -> None:
        pass

    def admission_refused(self, kind: str) -> None:
        pass

    def exec_finished(self, language: str, seconds: float) -> None:
        pass

    def webhook_outcome(self, outcome: str) -> None:
        pass

    def agent_error(self, kind: str) -> None:
        pass
