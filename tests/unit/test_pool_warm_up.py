"""A new pool VM runs bash and python3 once (kiln.node.pool.warm_up), so the
first exec of the user who claims it does not pay for translating them; a
failing warm-up costs the VM nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from kiln.node.pool import WARM_UP_COMMANDS, warm_up
from kiln.runtime.errors import AgentError


@dataclass
class StreamingAgent:
    failing: str | None = None  # argv[0] whose exec fails
    runs: list[list[str]] = field(default_factory=list)

    async def stream(self, op: str, timeout: float | None = None, **args: Any) -> AsyncIterator[dict]:
        assert op == "exec" and timeout is not None
        self.runs.append(args["argv"])
        if args["argv"][0] == self.failing:
            raise AgentError("ENOENT", f"{self.failing}: not found")
        yield {"kind": "result", "value": {"exit_code": 0}}


@dataclass
class Machine:
    agent: StreamingAgent
    vm_id: str = "vm-pool"


async def test_it_runs_bash_then_python3() -> None:
    agent = StreamingAgent()
    await warm_up(Machine(agent))  # type: ignore[arg-type]
    assert agent.runs == [list(argv) for argv in WARM_UP_COMMANDS]
    assert [argv[0] for argv in agent.runs] == ["/bin/bash", "python3"]


async def test_a_failing_command_is_logged_and_the_rest_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    agent = StreamingAgent(failing="/bin/bash")
    await warm_up(Machine(agent))  # type: ignore[arg-type]
    assert [argv[0] for argv in agent.runs] == ["/bin/bash", "python3"]
    assert "warm-up /bin/bash failed" in caplog.text and "vm-pool" in caplog.text
