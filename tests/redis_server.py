"""A real redis-server (Debian's `redis-server`, installed by make setup) for the tests.

It listens on 127.0.0.1 on a free port, keeps nothing on disk, and is stopped (and its
directory removed by pytest's tmp_path) when the test ends, even on failure. `restart`
keeps the port, so clients reconnect to the same address, and loses the data, as a
server without persistence does."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE = os.environ.get("WEFT_REQUIRE_KERNEL") == "1"  # CI: a missing server fails


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, bind: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.bind = bind
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.bind}:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            "redis-server",
            "--bind",
            self.bind,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "no",
        ]

    def start(self, wait: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir
        )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {self.bind}:{self.port} not up in {wait}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.bind, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def need_redis() -> None:
    if shutil.which("redis-server") is None:
        msg = "redis-server is not installed; make setup installs Debian's redis-server"
        if REQUIRE:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    need_redis()
    srv = RedisServer(tmp_path / "redis")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
