"""Compile bpf/weft.c with bcc into relocatable bytecode, and cache the result.

bcc rewrites map method calls (`map.lookup(&k)`) only in the file it is handed, not in
included headers. So the C stays split one concern per header under bpf/lib/, and this
module joins weft.c and the headers it includes into one translation unit, with `#line`
markers so compiler and verifier messages still name the real file and line. Configuration
goes in only as -D flags (DatapathSettings.cflags).

bcc compiles with throwaway maps. From the result we keep, per program, its instructions
and which `ld_imm64` loads which map; per map, its type, sizes and flags. The loader then
creates (or reopens) the agent's own pinned maps and patches their file descriptors in.
One compile therefore serves any number of agents and every restart: the artifact is cached
under settings.cache_dir by a hash of everything that shapes the bytecode.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import pickle
import platform
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from agent.datapath.settings import DatapathSettings

CACHE_FORMAT = 1  # bump when the cached JSON changes shape
MAIN_FILE = "weft.c"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
_LD_IMM64 = 0x18
_DEBUG_PREPROCESSOR = 0x4  # bcc: print the source after its rewriter, to stderr


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True)
class ProgramSpec:
    name: str
    insns: bytes
    map_refs: tuple[tuple[int, str], ...]
    """(instruction index, map name) of every ld_imm64 that loads a map."""

    def relocated(self, fds: dict[str, int]) -> bytes:
        code = bytearray(self.insns)
        for index, name in self.map_refs:
            struct.pack_into("=i", code, index * 8 + 4, fds[name])
        return bytes(code)


@dataclass(frozen=True)
class Artifact:
    key: str
    maps: tuple[MapSpec, ...]
    programs: tuple[ProgramSpec, ...]
    compile_seconds: float
    from_cache: bool

    def program(self, name: str) -> ProgramSpec:
        for p in self.programs:
            if p.name == name:
                return p
        raise KeyError(name)


def translation_unit(source_dir: Path) -> str:
    """weft.c with every `#include "..."` of bpf/ inlined once, marked with #line."""
    seen: set[Path] = set()

    def expand(path: Path) -> Iterator[str]:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        yield f'#line 1 "{path}"\n'
        for number, line in enumerate(path.read_text().splitlines(keepends=True), start=1):
            m = _INCLUDE.match(line)
            if m:
                yield from expand(path.parent / m.group(1))
                yield f'#line {number + 1} "{path}"\n'
            else:
                yield line

    return "".join(expand(source_dir / MAIN_FILE))


def _kernel_build_dir() -> str:
    return os.path.realpath(f"/lib/modules/{platform.release()}/build")


def _bcc_version() -> str:
    """bcc's version, read from its version.py without importing the package: importing
    bcc maps libbcc, LLVM and clang (about 60 MB) into the process for good, and the agent
    computes this key on every start, with the artifact usually cached."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    for location in spec.submodule_search_locations:
        with contextlib.suppress(OSError):
            text = (Path(location) / "version.py").read_text()
            m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text)
            if m:
                return m.group(1)
    return "unknown"


def artifact_key(settings: DatapathSettings, programs: Sequence[str]) -> str:
    """Hash of what shapes the bytecode: sources, flags, kernel, its headers, bcc."""
    h = hashlib.sha256()
    for part in (
        str(CACHE_FORMAT),
        translation_unit(settings.source_dir),
        "\0".join(settings.cflags()),
        "\0".join(programs),
        platform.release(),
        _kernel_build_dir(),
        _bcc_version(),
    ):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


def build(
    settings: DatapathSettings, programs: Sequence[str], *, in_child: bool = False
) -> Artifact:
    """The artifact for these settings: from the cache, or compiled (and then cached).

    `in_child`: compile in a short-lived child process, so that bcc, LLVM and clang never
    enter this one (the node agent: it would keep them mapped for its whole life, though it
    compiles only when the C source, its flags, the kernel or bcc change)."""
    key = artifact_key(settings, programs)
    cached = _read_cache(settings.cache_dir, key)
    if cached is not None:
        return cached
    if in_child:
        started = time.monotonic()
        _compile_in_child(settings, programs)
        built = _read_cache(settings.cache_dir, key)
        if built is None:
            raise RuntimeError(
                f"the compiler process wrote no artifact {key} under {settings.cache_dir}"
            )
        return replace(built, from_cache=False, compile_seconds=time.monotonic() - started)
    artifact = _compile(settings, programs, key)
    _write_cache(settings.cache_dir, artifact)
    return artifact


def _compile_in_child(settings: DatapathSettings, programs: Sequence[str]) -> None:
    """`python -m agent.datapath.compiler`, given the settings on stdin (pickled: from this
    process to its own child), compiles and caches. Its stderr carries clang's messages,
    which an error quotes."""
    proc = subprocess.run(
        [sys.executable, "-m", "agent.datapath.compiler"],
        input=pickle.dumps((settings, tuple(programs))),
        capture_output=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip()[-4000:]
        raise RuntimeError(
            f"compiling {settings.source_dir / MAIN_FILE} failed (exit {proc.returncode}):\n{tail}"
        )


def _child_main() -> None:
    settings, programs = pickle.load(sys.stdin.buffer)
    build(settings, programs)


def cached(settings: DatapathSettings, programs: Sequence[str]) -> bool:
    return _read_cache(settings.cache_dir, artifact_key(settings, programs)) is not None


def preprocessed(settings: DatapathSettings) -> str:
    """The C exactly as bcc compiles it, after bcc's rewriter (maps become
    `bpf_pseudo_fd(...)`), preceded by the flags. Kernel headers stay as #include lines."""
    with _stderr_captured() as captured:
        bpf = _bcc_compile(settings, debug=_DEBUG_PREPROCESSOR)
        bpf.cleanup()  # type: ignore[attr-defined]
    text = captured[0]
    # bcc prints its clang command line, then the source.
    body = text.split(" -x c /virtual/main.c\n", 1)[-1]
    header = "\n".join(
        [
            "/* weft data path, as the agent compiles it.",
            f" * sources: {settings.source_dir}",
            " * flags:   " + " ".join(_compile_flags(settings)),
            " */",
            "",
        ]
    )
    return header + body


# ---- internals ---------------------------------------------------------------------------


def _compile_flags(settings: DatapathSettings) -> list[str]:
    return [f"-I{settings.source_dir}", *settings.cflags()]


def _bcc_compile(settings: DatapathSettings, debug: int = 0) -> object:
    from bcc import BPF

    try:
        with _stdout_to_stderr():
            return BPF(
                text=translation_unit(settings.source_dir).encode(),
                cflags=_compile_flags(settings),
                debug=debug,
            )
    except Exception as e:  # bcc raises a bare Exception after printing clang's messages
        raise RuntimeError(
            f"bcc could not compile {settings.source_dir / MAIN_FILE}: {e} "
            "(clang's messages above name the file and line)"
        ) from None


class _Tables:
    """ctypes prototypes for bcc's by-index table queries (bcc's Python declares few)."""

    def __init__(self, module: int) -> None:
        from bcc import libbcc

        lib = ctypes.CDLL(libbcc.lib._name)
        self.module = ctypes.c_void_p(module)
        size_t, voidp = ctypes.c_size_t, ctypes.c_void_p
        for fn, res in [
            ("bpf_table_name", ctypes.c_char_p),
            ("bpf_table_fd_id", ctypes.c_int),
            ("bpf_table_type_id", ctypes.c_int),
            ("bpf_table_key_size_id", size_t),
            ("bpf_table_leaf_size_id", size_t),
            ("bpf_table_max_entries_id", size_t),
            ("bpf_table_flags_id", ctypes.c_int),
        ]:
            f = getattr(lib, fn)
            f.restype = res
            f.argtypes = [voidp, size_t]
        lib.bpf_num_tables.restype = size_t
        lib.bpf_num_tables.argtypes = [voidp]
        self.lib = lib

    def specs(self) -> tuple[list[MapSpec], dict[int, str]]:
        lib, m = self.lib, self.module
        specs: list[MapSpec] = []
        by_fd: dict[int, str] = {}
        for i in range(lib.bpf_num_tables(m)):
            name = lib.bpf_table_name(m, i).decode()
            specs.append(
                MapSpec(
                    name=name,
                    type=lib.bpf_table_type_id(m, i),
                    key_size=lib.bpf_table_key_size_id(m, i),
                    value_size=lib.bpf_table_leaf_size_id(m, i),
                    max_entries=lib.bpf_table_max_entries_id(m, i),
                    flags=lib.bpf_table_flags_id(m, i),
                )
            )
            by_fd[lib.bpf_table_fd_id(m, i)] = name
        return specs, by_fd


def _compile(settings: DatapathSettings, programs: Sequence[str], key: str) -> Artifact:
    started = time.monotonic()
    bpf = _bcc_compile(settings)
    try:
        maps, by_fd = _Tables(bpf.module).specs()  # type: ignore[attr-defined]
        progs = []
        for name in programs:
            insns = bytes(bpf.dump_func(name.encode()))  # type: ignore[attr-defined]
            refs = []
            for index in range(0, len(insns) // 8):
                code, regs, _off, imm = struct.unpack_from("=BBhi", insns, index * 8)
                if code == _LD_IMM64 and regs >> 4 == 1:  # src_reg BPF_PSEUDO_MAP_FD
                    refs.append((index, by_fd[imm]))
            progs.append(ProgramSpec(name, insns, tuple(refs)))
    finally:
        bpf.cleanup()  # type: ignore[attr-defined]
    return Artifact(
        key=key,
        maps=tuple(maps),
        programs=tuple(progs),
        compile_seconds=time.monotonic() - started,
        from_cache=False,
    )


def _cache_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"weft-{key}.json"


def _read_cache(cache_dir: Path, key: str) -> Artifact | None:
    try:
        doc = json.loads(_cache_file(cache_dir, key).read_text())
    except (OSError, ValueError):
        return None
    if doc.get("format") != CACHE_FORMAT or doc.get("key") != key:
        return None
    return Artifact(
        key=key,
        maps=tuple(MapSpec(**m) for m in doc["maps"]),
        programs=tuple(
            ProgramSpec(
                p["name"],
                base64.b64decode(p["insns"]),
                tuple((int(i), str(n)) for i, n in p["map_refs"]),
            )
            for p in doc["programs"]
        ),
        compile_seconds=float(doc["compile_seconds"]),
        from_cache=True,
    )


def _write_cache(cache_dir: Path, artifact: Artifact) -> None:
    doc = {
        "format": CACHE_FORMAT,
        "key": artifact.key,
        "compile_seconds": artifact.compile_seconds,
        "maps": [m.__dict__ for m in artifact.maps],
        "programs": [
            {
                "name": p.name,
                "insns": base64.b64encode(p.insns).decode(),
                "map_refs": [list(r) for r in p.map_refs],
            }
            for p in artifact.programs
        ],
    }
    # A cache that cannot be written costs the next start 2-3 s, nothing more.
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".weft-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, _cache_file(cache_dir, artifact.key))


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """bcc's debug output goes to file descriptor 2 from C; catch it. The text lands in
    the yielded list when the block ends."""
    box: list[str] = []
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            out.seek(0)
            box.append(out.read().decode(errors="replace"))


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """libbcc prints notes ("Running from kernel directory ...") to file descriptor 1;
    keep them off stdout, which may be a pipe of C (dump) or of JSON (a test agent)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


if __name__ == "__main__":
    _child_main()
