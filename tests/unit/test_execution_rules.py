"""Pure rules of execution and sessions: output caps, time limits, /proc parsing, SSE."""

from __future__ import annotations

import os

import pytest

from kiln.cli import server_sent_events
from kiln.services.errors import InvalidRequest
from kiln.services.execution import (
    DEFAULT_TIMEOUT_SECONDS,
    MAX_TIMEOUT_SECONDS,
    CappedOutput,
    check_timeout,
    guest_time_limit,
)
from kiln.services.sessions import read_process_usage


def test_capped_output_keeps_the_limit_and_marks_the_cut() -> None:
    output = CappedOutput(limit=5)
    output.add(b"abc")
    output.add(b"defgh")
    assert output.text(cut_elsewhere=False) == "abcde\n[kiln: output truncated after 5 bytes]"
    untouched = CappedOutput(limit=5)
    untouched.add(b"ok")
    assert untouched.text(cut_elsewhere=False) == "ok"
    # The agent's shared limit may have cut this stream although it has room.
    assert untouched.text(cut_elsewhere=True).endswith("[kiln: output truncated after 2 bytes]")


def test_capped_output_decodes_what_utf8_it_can() -> None:
    output = CappedOutput(limit=100)
    output.add("é".encode() + b"\xff")
    assert output.text(cut_elsewhere=False) == "é\ufffd"


def test_timeouts_default_are_bounded_and_leave_a_reply_margin() -> None:
    assert check_timeout(None) == DEFAULT_TIMEOUT_SECONDS
    with pytest.raises(InvalidRequest):
        check_timeout(MAX_TIMEOUT_SECONDS + 1)
    assert guest_time_limit(60) == 59
    assert guest_time_limit(2) == 1.5  # at most a quarter of a short timeout
    assert 0 < guest_time_limit(0.1) < 0.1


def test_process_usage_is_read_from_proc() -> None:
    usage = read_process_usage(os.getpid())
    assert usage is not None and usage.cpu_seconds > 0 and usage.rss_mb > 1
    assert read_process_usage(2**22 + 12345) is None  # no such process


def test_server_sent_events_are_parsed_as_blocks() -> None:
    lines = ["event: stdout", 'data: "a\\n"', "", ": comment", "event: exit", "data: {}", ""]
    assert list(server_sent_events(iter(lines))) == [("stdout", '"a\\n"'), ("exit", "{}")]
