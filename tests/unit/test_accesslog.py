"""The waypoint's access log: complete, one JSON object per line, batched per loop turn."""

from __future__ import annotations

import asyncio
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest

from agent import accesslog
from agent.accesslog import FLUSH_BYTES, FLUSH_INTERVAL, AccessLog
from controller.errors import EnvironmentProblem


class CountingIO(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def test_lines_are_written_together_within_the_flush_interval_and_all_arrive() -> None:
    out = CountingIO()
    log = AccessLog(out)

    async def burst() -> None:
        for i in range(100):
            log.write({"n": i, "path": "/v1/chat/completions"})
            await asyncio.sleep(0)  # requests arrive over several loop turns
        assert out.writes == 0  # nothing yet: the interval has not passed
        await asyncio.sleep(FLUSH_INTERVAL * 2)

    asyncio.run(burst())
    assert out.writes == 1
    lines = out.getvalue().splitlines()
    assert [json.loads(x)["n"] for x in lines] == list(range(100))
    assert log.lines == 100


def test_a_large_burst_is_written_before_the_interval_ends() -> None:
    out = CountingIO()
    log = AccessLog(out)

    async def burst() -> None:
        for _ in range(FLUSH_BYTES // 1000 + 2):
            log.write({"pad": "x" * 1000})
        assert out.writes >= 1  # the buffer is bounded

    asyncio.run(burst())
    log.flush()  # as the drain does: what the interval has not written yet
    assert len(out.getvalue().splitlines()) == FLUSH_BYTES // 1000 + 2


def test_outside_a_loop_lines_are_written_at_once_and_close_flushes(tmp_path: Path) -> None:
    p = tmp_path / "access.log"
    log = AccessLog.open(str(p))
    log.write({"a": 1})
    log.close()
    assert json.loads(p.read_text()) == {"a": 1}


def test_values_json_cannot_encode_are_strings_and_newlines_stay_escaped() -> None:
    out = io.StringIO()
    log = AccessLog(out)
    log.write({"path": '/x\n{"forged":1}', "when": object.__new__(object)})
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["path"] == '/x\n{"forged":1}'


def test_off_writes_nothing_and_a_missing_directory_is_named(tmp_path: Path) -> None:
    log = AccessLog.open("off")
    assert not log.enabled
    log.write({"a": 1})
    log.close()
    with pytest.raises(EnvironmentProblem, match="nope"):
        AccessLog.open(str(tmp_path / "nope" / "access.log"))


def test_a_broken_stdout_does_not_fail_the_request() -> None:
    out = io.StringIO()
    out.close()
    AccessLog(out).write({"a": 1})  # no exception


def test_timestamp_is_utc_seconds() -> None:
    stamp = AccessLog(None).timestamp()
    assert len(stamp) == 20 and stamp.endswith("Z") and stamp[10] == "T"


def test_sampling_keeps_every_important_line_and_a_share_of_the_rest():
    out = io.StringIO()
    log = AccessLog(out, sample=0.1, rng=random.Random(7))
    for i in range(1000):
        log.write({"kind": "request", "i": i})
    for i in range(20):
        log.write({"kind": "request", "status": 503, "i": i}, important=True)
    log.flush()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert sum(1 for x in lines if x.get("status") == 503) == 20  # never sampled out
    ordinary = sum(1 for x in lines if "status" not in x)
    assert 60 <= ordinary <= 140 and log.sampled_out == 1000 - ordinary


def test_a_cap_per_second_says_how_many_lines_it_left_out(monkeypatch):
    """Ordinary lines are capped; important ones never (a flood of cheap requests cannot
    hide a denial); the count of what was left out is written, also at close."""
    clock = [100.0]
    monkeypatch.setattr(accesslog.time, "monotonic", lambda: clock[0])

    class Kept(io.StringIO):
        def close(self) -> None:  # read after the log closes it
            pass

    out = Kept()
    log = AccessLog(out, max_per_second=5)
    for i in range(12):
        log.write({"i": i})
    log.write({"i": "denied"}, important=True)
    clock[0] += 1
    log.write({"i": "next"})
    for i in range(7):
        log.write({"i": f"more-{i}"})
    log.close()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x.get("i") for x in lines[:6]] == [0, 1, 2, 3, 4, "denied"]
    assert lines[6] == {**lines[6], "kind": "suppressed", "lines": 7}
    assert lines[7]["i"] == "next"
    assert lines[-1]["kind"] == "suppressed" and lines[-1]["lines"] == 3  # at close
    assert log.suppressed == 10


def test_a_file_log_is_rotated_past_its_size(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog.open(str(path), max_mb=0.001)  # about 1 KiB
    for i in range(100):
        log.write({"kind": "request", "i": i, "pad": "x" * 40})
        log.flush()
    log.close()
    old = (tmp_path / "access.log.1").read_text().splitlines()
    new = path.read_text().splitlines()
    assert old and len(path.read_bytes()) < 2048
    assert json.loads(new[-1])["i"] == 99  # nothing lost across a rotation but older files
    assert not list(tmp_path.glob("access.log.2"))


def test_template_helpers_escape_as_the_encoder_does() -> None:
    """quote() and members() (for hot paths that render fixed fields from a template)
    write what the record's own encoding writes: escapes, non-ASCII, None."""
    from agent.accesslog import _encode, members, quote

    for v in ['/x\n{"forged":1}', "caf\u00e9 \u2028", '\\"', "", None]:
        assert quote(v) == _encode({"k": v})[5:-1]
        assert json.loads(quote(v)) == v
    rec = {"traceId": "ab", "fallbacks": ["m1", None], "tokens": 3, "ttftMs": 1.5}
    assert json.loads("{" + members(rec) + "}") == rec
    assert members({}) == ""


def test_write_json_is_sampled_capped_and_stopped_as_write_is(monkeypatch) -> None:
    """write_json asks _admit only when it could say no: the same lines come out as
    through write, with sampling, with a cap, and none once the log is closed."""
    monkeypatch.setattr(accesslog.time, "monotonic", lambda: 100.0)

    def lines(method: str, **kw: Any) -> list[Any]:
        out = io.StringIO()
        log = AccessLog(out, rng=random.Random(3), **kw)
        for i in range(50):
            if method == "write":
                log.write({"i": i}, important=i % 10 == 0)
            else:
                log.write_json(f'{{"i":{i}}}', important=i % 10 == 0)
        log.flush()
        return [json.loads(x) for x in out.getvalue().splitlines()]

    for kw in ({}, {"sample": 0.3}, {"max_per_second": 7}):
        assert lines("write", **kw) == lines("write_json", **kw), kw
    assert len(lines("write_json")) == 50 and len(lines("write_json", sample=0.3)) < 50

    log = AccessLog(io.StringIO())
    assert log.enabled
    log.close()
    assert not log.enabled
    log.write_json('{"after":"close"}')  # dropped, no exception
    assert log.lines == 0
