"""Node bootstrap tokens for the local store.

Only a SHA-256 of each token is kept, so reading the file does not let anyone bootstrap a
node. Tokens are bound to one node name and expire; reuse within the lifetime is allowed
so an agent that restarts before its first renewal can bootstrap again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path


class TokenStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict[str, float | str]]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def _save(self, data: dict[str, dict[str, float | str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        tmp.replace(self.path)

    @staticmethod
    def _digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def create(self, node: str, ttl: float) -> tuple[str, float]:
        token = f"weft-node.{node}.{secrets.token_urlsafe(32)}"
        expires = time.time() + ttl
        with self._lock:
            data = {k: v for k, v in self._load().items() if float(v["expires"]) > time.time()}
            data[self._digest(token)] = {"node": node, "expires": expires}
            self._save(data)
        return token, expires

    def verify(self, token: str, node: str) -> bool:
        digest = self._digest(token)
        with self._lock:
            data = self._load()
        for k, v in data.items():
            if hmac.compare_digest(k, digest):
                return v["node"] == node and float(v["expires"]) > time.time()
        return False
