"""The guest agent, run on the host as a subprocess over a socketpair."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from unit.agent_process import AgentConnection, agent_command, agent_env, b64, running_agent

from kiln.guest import protocol


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentConnection]:
    etc = tmp_path / "etc"
    etc.mkdir()
    with running_agent("--etc-dir", str(etc), "--workdir", str(tmp_path)) as connection:
        connection.etc = etc
        yield connection


def test_ping(agent: AgentConnection) -> None:
    value = agent.call("ping")
    assert value["pid"] == agent.process.pid
    assert value["uptime"] > 0
    assert abs(value["time_ns"] - time.time_ns()) < 5 * 10**9


def test_set_clock_answers_the_clock_it_replaced(agent: AgentConnection) -> None:
    # --no-system: the host's clock is left alone, the op still checks its input.
    assert agent.error("set_clock", time_ns="now") == "EINVAL"
    value = agent.call("set_clock", time_ns=time.time_ns())
    assert abs(value["previous_ns"] - time.time_ns()) < 5 * 10**9


def test_unknown_op_and_bad_frames_do_not_kill_the_agent(agent: AgentConnection) -> None:
    assert agent.error("frobnicate") == "EUNKNOWNOP"
    agent.sock.sendall(protocol.HEADER.pack(3) + b"{x]")  # not JSON
    agent.sock.sendall(protocol.encode_frame({"op": "ping"}))  # no id
    assert agent.error("exec") == "EINVAL"
    assert agent.call("ping")["pid"] == agent.process.pid


def test_exec_streams_output_and_reports_exit_code(agent: AgentConnection) -> None:
    out, err, result = agent.run(argv=["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (out, err) == (b"out\n", b"err\n")
    assert result["exit_code"] == 3
    assert result["timed_out"] is False and result["truncated"] is False
    assert result["duration"] >= 0 and result["cpu_time"] >= 0


def test_exec_shell_env_cwd_stdin(agent: AgentConnection, tmp_path: Path) -> None:
    out, _, _ = agent.run(shell="echo $GREETING; pwd; cat", env={"GREETING": "hi there"},
                          cwd="/", stdin=b64(b"from stdin"))
    assert out == b"hi there\n/\nfrom stdin"
    out, _, _ = agent.run(shell="pwd")
    assert out.decode().strip() == str(tmp_path)


def test_exec_missing_program_and_cwd(agent: AgentConnection) -> None:
    assert agent.error("exec", argv=["/no/such/program"]) == "ENOENT"
    assert agent.error("exec", argv=["true"], cwd="/no/such/dir") == "ENOENT"


def test_exec_reports_cpu_time_of_children(agent: AgentConnection) -> None:
    _, _, result = agent.run(shell="i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done")
    assert result["cpu_time"] > 0.05


def test_exec_timeout_kills_the_process_group(agent: AgentConnection, tmp_path: Path) -> None:
    marker = tmp_path / "survivor"
    started = time.monotonic()
    _, _, result = agent.run(shell=f"(sleep 3; touch {marker}) & sleep 30", timeout=0.5)
    assert time.monotonic() - started < 5
    assert result["timed_out"] is True
    assert result["exit_code"] == -9
    time.sleep(3.5)
    assert not marker.exists(), "the background child in the group survived the timeout"


def test_exec_returns_while_a_background_child_holds_the_pipes(agent: AgentConnection) -> None:
    started = time.monotonic()
    out, _, result = agent.run(shell="echo started; sleep 20 &")
    assert out == b"started\n"
    assert result["exit_code"] == 0
    assert time.monotonic() - started < 5


def test_exec_output_limit_truncates_but_drains(agent: AgentConnection) -> None:
    out, _, result = agent.run(shell="head -c 3000000 /dev/zero; echo done >&2", output_limit=1000)
    assert len(out) == 1000
    assert result["truncated"] is True and result["exit_code"] == 0


def test_exec_large_output_is_chunked(agent: AgentConnection) -> None:
    events, final = agent.wait(agent.start("exec", shell="head -c 1000000 /dev/zero"))
    sizes = [len(base64.b64decode(event["data"])) for event in events]
    assert sum(sizes) == 1000000
    assert max(sizes) <= protocol.CHUNK_BYTES
    assert final["value"]["truncated"] is False


def test_slow_exec_does_not_block_ping(agent: AgentConnection) -> None:
    slow = agent.start("exec", shell="sleep 3")
    chatty = agent.start("exec", shell="head -c 20000000 /dev/zero")
    started = time.monotonic()
    agent.call("ping")
    assert time.monotonic() - started < 1.5
    assert agent.wait(chatty)[1]["value"]["exit_code"] == 0
    assert agent.wait(slow)[1]["value"]["exit_code"] == 0


def test_write_read_stat_list(agent: AgentConnection, tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "file.bin")
    assert agent.error("write_file", path=path, data=b64(b"x")) == "ENOENT"
    assert agent.call("write_file", path=path, data=b64(b"hello world"), mkdirs=True, mode=0o600) == {"size": 11}
    assert agent.call("write_file", path=path, data=b64(b"WORLD"), offset=6) == {"size": 11}
    assert (tmp_path / "sub" / "file.bin").read_bytes() == b"hello WORLD"
    assert agent.call("write_file", path=path, data=b64(b"!"), offset=5, truncate=True) == {"size": 6}
    assert agent.error("write_file", path=str(tmp_path), data=b64(b"x")) == "EISDIR"

    value = agent.call("read_file", path=path)
    assert base64.b64decode(value["data"]) == b"hello!" and value["eof"] is True and value["size"] == 6
    value = agent.call("read_file", path=path, offset=1, length=2)
    assert base64.b64decode(value["data"]) == b"el" and value["eof"] is False
    assert agent.error("read_file", path=str(tmp_path / "missing")) == "ENOENT"
    assert agent.error("read_file", path=str(tmp_path)) == "EISDIR"

    info = agent.call("stat", path=path)
    assert info["size"] == 6 and info["is_dir"] is False and info["mode"] == 0o600
    assert agent.call("stat", path=str(tmp_path))["is_dir"] is True
    assert agent.error("stat", path=str(tmp_path / "missing")) == "ENOENT"

    (tmp_path / "a.txt").write_text("a")
    flat = agent.call("list", path=str(tmp_path))["entries"]
    assert {Path(entry["path"]).name for entry in flat} >= {"a.txt", "sub", "etc"}
    assert path not in {entry["path"] for entry in flat}
    deep = agent.call("list", path=str(tmp_path), recursive=True)["entries"]
    assert path in {entry["path"] for entry in deep}
    limited = agent.call("list", path=str(tmp_path), recursive=True, limit=2)
    assert len(limited["entries"]) == 2 and limited["truncated"] is True
    assert agent.error("list", path=path) == "ENOTDIR"


def test_large_file_round_trip_in_chunks(agent: AgentConnection, tmp_path: Path) -> None:
    payload = os.urandom(3 * protocol.CHUNK_BYTES + 17)
    path = str(tmp_path / "big")
    for offset in range(0, len(payload), protocol.CHUNK_BYTES):
        agent.call("write_file", path=path, data=b64(payload[offset : offset + protocol.CHUNK_BYTES]), offset=offset)
    received, offset = b"", 0
    while True:
        value = agent.call("read_file", path=path, offset=offset)
        received += base64.b64decode(value["data"])
        offset = len(received)
        if value["eof"]:
            break
    assert received == payload


def test_set_env_round_trips_awkward_values(agent: AgentConnection) -> None:
    value = 'spaces and "quotes" \\ $HOME ünïcødé'
    assert agent.call("set_env", env={"AWKWARD": value, "PLAIN": "1"}) == {}
    out, _, _ = agent.run(argv=[sys.executable, "-c", "import os; print(os.environ['AWKWARD'], end='')"])
    assert out.decode() == value
    environment = (agent.etc / "environment").read_text()
    assert 'PLAIN="1"' in environment
    assert 'AWKWARD="spaces and \\"quotes\\" \\\\ \\$HOME ünïcødé"' in environment
    # A shell sourcing the file gets the exact value back, and runs nothing of it.
    tricky = "`echo injected` $(echo injected) ${HOME} \\ \"q\" 'single'"
    assert agent.call("set_env", env={"TRICKY": tricky}) == {}
    sourced = subprocess.run(
        ["env", "-i", "sh", "-c", f". {agent.etc / 'environment'}; printf %s \"$TRICKY\""],
        capture_output=True, check=True, text=True,
    )
    assert sourced.stdout == tricky
    assert agent.error("set_env", env={"A=B": "x"}) == "EINVAL"


def test_post_restore(agent: AgentConnection) -> None:
    assert agent.error("post_restore", seed=b64(b"short"), time_ns=time.time_ns(), hostname="h") == "EINVAL"
    value = agent.call("post_restore", seed=b64(os.urandom(32)), time_ns=time.time_ns(), hostname="vm-1")
    assert value == {}
    assert (agent.etc / "hostname").read_text() == "vm-1\n"


def test_python_sessions_persist_and_recover(agent: AgentConnection) -> None:
    out, _, result = agent.run("python_exec", session="s1", code="x = 41\nprint('set')")
    assert out == b"set\n" and result["exit_code"] == 0 and result["timed_out"] is False
    out, _, result = agent.run("python_exec", session="s1", code="x += 1\nprint(x)")
    assert out == b"42\n"
    _, err, result = agent.run("python_exec", session="s1", code="1 / 0")
    assert result["exit_code"] == 1 and b"ZeroDivisionError" in err and b"1 / 0" in err
    out, _, _ = agent.run("python_exec", session="s1", code="print(x)")
    assert out == b"42\n", "an exception must not lose the session"
    _, err, _ = agent.run("python_exec", session="s2", code="print(x)")
    assert b"NameError" in err, "sessions are separate"


def test_python_timeout_loses_state_and_next_call_starts_fresh(agent: AgentConnection) -> None:
    agent.run("python_exec", session="t", code="y = 1")
    slow = "print('before', flush=True)\nimport time\ntime.sleep(30)"
    out, err, result = agent.run("python_exec", session="t", code=slow, timeout=1)
    assert result["timed_out"] is True and result["exit_code"] == 1
    assert out == b"before\n" and b"state was lost" in err
    _, err, result = agent.run("python_exec", session="t", code="print(y)")
    assert b"NameError" in err
    out, _, result = agent.run("python_exec", session="t", code="print('fresh')")
    assert out == b"fresh\n" and result["exit_code"] == 0


def test_python_exit_kills_only_that_session(agent: AgentConnection) -> None:
    _, err, result = agent.run("python_exec", session="e", code="import os; os._exit(5)")
    assert result["exit_code"] == 1 and b"state was lost" in err
    out, _, _ = agent.run("python_exec", session="e", code="print('again')")
    assert out == b"again\n"


def test_shutdown_replies_then_exits(agent: AgentConnection) -> None:
    assert agent.call("shutdown") == {}
    assert agent.process.wait(timeout=10) == 0


def test_listening_socket_serves_the_next_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    process = subprocess.Popen(agent_command("--socket", path, "--no-system", "--etc-dir", str(tmp_path)),
                               env=agent_env())
    try:
        for _ in range(100):
            if os.path.exists(path):
                break
            time.sleep(0.05)
        for _ in range(2):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            connection = AgentConnection(sock)
            # Leave a request in flight when disconnecting: the agent must cope.
            connection.start("exec", shell="sleep 1; echo late")
            assert connection.call("ping")["pid"] == process.pid
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
    finally:
        process.kill()
        process.wait()


def test_frame_decoder_splits_a_stream_fed_byte_by_byte() -> None:
    frames = [protocol.encode_frame({"id": i, "op": "ping", "pad": "x" * i * 300}) for i in range(3)]
    decoder = protocol.FrameDecoder()
    bodies = [body for byte in b"".join(frames) for body in decoder.feed(bytes([byte]))]
    assert [protocol.decode_body(body)["id"] for body in bodies] == [0, 1, 2]
    assert decoder.discarded == 0


def test_frame_decoder_recovers_from_a_torn_frame_and_garbage() -> None:
    torn = protocol.encode_frame({"id": 1, "op": "exec", "shell": "x" * 1000})[:700]
    whole = [protocol.encode_frame({"id": i, "op": "ping"}) for i in (2, 3)]
    decoder = protocol.FrameDecoder()
    bodies = decoder.feed(b"garbage" + torn) + decoder.feed(whole[0]) + decoder.feed(whole[1])
    assert [protocol.decode_body(body)["id"] for body in bodies] == [2, 3]
    assert decoder.discarded == len(b"garbage") + len(torn)


def test_agent_recovers_from_a_torn_request(agent: AgentConnection) -> None:
    agent.sock.sendall(protocol.encode_frame({"id": 999, "op": "exec", "shell": "echo"})[:9])
    assert agent.call("ping")["pid"] == agent.process.pid
