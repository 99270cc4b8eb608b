"""A directory of YAML/JSON manifests: the embedded default on one machine.

Each file is one source in the store: editing a file replaces exactly what that file
provides; a file with a syntax error keeps everything it provided before; a deleted file
removes its resources. The directory is polled (cheap stat calls) rather than watched with
inotify, which does not see changes made through some bind mounts and ConfigMap symlink
swaps, the way Kubernetes updates mounted config.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from controller.model.bulk import collector_paused
from controller.model.loader import parse_text
from controller.store import ConfigStore, Offer

log = logging.getLogger("weft.source.files")

SUFFIXES = (".yaml", ".yml", ".json")
APPLIED_DIR = "applied"  # where `weft policy apply` writes what it stores


class FileSource:
    def __init__(self, root: Path, store: ConfigStore, *, interval: float = 1.0) -> None:
        self.root = root
        self.store = store
        self.interval = interval
        self._seen: dict[Path, tuple[int, int, int]] = {}

    def source_id(self, path: Path) -> str:
        return f"file:{path.relative_to(self.root)}"

    def _files(self) -> list[Path]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            # Skip dot-directories: Kubernetes ConfigMap mounts keep old revisions in ..data.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out += [
                Path(dirpath) / f
                for f in sorted(filenames)
                if f.endswith(SUFFIXES) and not f.startswith(".")
            ]
        return out

    def scan(self) -> int:
        """One pass; returns how many files changed."""
        # The first pass over a large config is a mesh's worth of surviving objects.
        with collector_paused():
            return self._scan()

    def _scan(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        present = set()
        changed = 0
        for path in self._files():
            present.add(path)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._seen.get(path) == sig:
                continue
            self._seen[path] = sig
            changed += 1
            self.load(path)
        for path in list(self._seen):
            if path not in present:
                del self._seen[path]
                changed += 1
                self.store.offer(self.source_id(path), Offer())
                log.info("%s removed: its resources are deleted", path)
        return changed

    def load(self, path: Path) -> None:
        try:
            text = path.read_bytes()
        except OSError as e:
            log.warning("cannot read %s: %s", path, e)
            return
        shown = str(path.relative_to(self.root))
        offer = parse_text(text, shown)
        keys = self.store.offer(self.source_id(path), offer)
        if keys:
            log.info("%s: %d resource(s) changed", shown, len(keys))

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.scan)
            await asyncio.sleep(self.interval)
