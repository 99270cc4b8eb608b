"""What a waypoint process loads. Its memory target (issue 13: at most 60 MB RSS) is met by
not importing what it never uses; these checks keep a new top-level import from quietly
bringing the weight back. Memory itself is measured by `make bench`, not asserted here."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Each costs a waypoint several MB (measured on import, CPython 3.11): cryptography about
# 10 (its own OpenSSL), pyroute2 about 20, grpc about 12, protobuf about 3.
NOT_IN_A_WAYPOINT = ("cryptography", "grpc", "google.protobuf", "pyroute2")


def test_weft_waypoint_run_loads_no_x509_grpc_protobuf_or_netlink_library():
    """`weft waypoint run` imports the whole CLI and the waypoint server; neither may pull in
    the libraries only the agent, the controller or `weft lab` need."""
    code = (
        "import sys, agent.cli, agent.waypoint.server\n"
        f"print(','.join(m for m in {NOT_IN_A_WAYPOINT!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "", f"a waypoint imports {out.stdout.strip()}"


def _run(code: str, *args: str) -> str:
    """What `code` prints in a fresh interpreter (sys.argv[1:] = args)."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def test_the_agent_does_not_load_bcc_to_know_whether_its_artifact_is_cached():
    """Importing bcc maps libbcc, LLVM and clang (about 60 MB) for the life of the process.
    The agent keys its compile cache by bcc's version, read from bcc's version.py; the
    compile itself, when needed, runs in a child process (agent/datapath/compiler.py)."""
    code = (
        "import sys, agent.cli, agent.main\n"
        "from agent.datapath import compiler\n"
        "v = compiler._bcc_version()\n"
        "print(v, 'bcc' in sys.modules)"
    )
    version, loaded = _run(code).split()
    assert loaded == "False"
    try:
        real = _run("from bcc.version import __version__; print(__version__)")
    except subprocess.CalledProcessError:
        assert version == "absent"
    else:
        assert version == real


def test_the_agent_loads_neither_grpcio_nor_cryptography():
    """`weft agent run` leaves out grpcio's C core (cygrpc's mapped code, libstdc++ and six
    threads: about 17 MB of RSS in a lab agent) and cryptography (its own OpenSSL: about
    8 MB). The agent's calls to the controller go through grpclib (agent/identity/rpc.py;
    the generated *_pb2_grpc stubs import grpcio, so they are left out too), its keys and
    CSRs through the libcrypto the ssl module already maps (agent/identity/keys.py)."""
    code = (
        "import sys, agent.cli, agent.main\n"
        "import agent.config.client, agent.identity.manager, agent.identity.node\n"
        "print(','.join(m for m in sys.modules if m.split('.')[0] in ('grpc', 'cryptography')"
        " or m.endswith('_pb2_grpc')))"
    )
    assert _run(code) == ""


def test_the_agent_process_keeps_none_of_the_cli_and_runs_without_docstrings():
    """`weft agent run` execs agent/run.py once its options are parsed, so the process
    that runs for the node's life holds neither typer nor the other command groups
    (`weft lab`, `weft policy`, `weft top`...): 2.7 MB of RSS on import. It runs under -OO
    (1.8 MB of docstrings): what it imports must not need them."""
    code = (
        "import sys, agent.run, agent.main\n"
        "import agent.config.client, agent.identity.manager, agent.identity.node\n"
        "assert sys.flags.optimize == 2 and agent.main.__doc__ is None\n"
        "print(','.join(m for m in sys.modules if m.split('.')[0] in ('typer', 'click')"
        " or m.startswith(('agent.cli', 'agent.lab'))))"
    )
    out = subprocess.run(
        [sys.executable, "-OO", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""


def test_config_validators_are_built_when_first_used_and_all_at_once_on_request():
    """Importing the agent builds no config model's validator (pydantic's defer_build: 4 MB
    of an agent for kinds it may never receive); validating a kind builds that kind; and
    build_validators(), which the controller calls before its sources validate on threads,
    leaves none deferred."""
    code = (
        "import agent.cli, agent.main\n"
        "from controller.model.base import Model, build_validators, resource_from_json\n"
        "def walk(c):\n"
        "    yield c\n"
        "    for s in c.__subclasses__(): yield from walk(s)\n"
        "def built(): return sorted(c.__name__ for c in walk(Model) if c.__pydantic_complete__)\n"
        "before = built()\n"
        'resource_from_json(\'Node\', \'{"apiVersion":"weft.dev/v1alpha1","kind":"Node",'
        '"metadata":{"name":"n1"},"spec":{"addresses":["10.0.0.1"]}}\')\n'
        "after_node = built()\n"
        "build_validators()\n"
        "print(before, 'Node' in after_node, 'HTTPRoute' in after_node,"
        " len(built()) == len(list(walk(Model))))"
    )
    assert _run(code) == "[] True False True"


def test_freed_heap_is_given_back_where_the_libc_can():
    """agent/memtrim.py: with every other one of 5,000 16-KB blocks freed, the free pages sit
    in the middle of the heap, where glibc keeps them; trim() gives them back (RSS drops by
    most of the 40 MB), and the periodic task runs without failing."""
    out = _run(
        "import asyncio, platform\n"
        "from agent import memtrim\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS'): return int(line.split()[1]) // 1024\n"
        "blocks = [bytearray(16384) for _ in range(5000)]\n"
        "del blocks[::2]\n"
        "before = rss()\n"
        "ok = memtrim.trim()\n"
        "print(ok, before - rss() if ok else 'n/a', platform.libc_ver()[0])\n"
        "async def main():\n"
        "    t = asyncio.ensure_future(memtrim.run(0.01))\n"
        "    await asyncio.sleep(0.1)\n"
        "    print(not t.done())\n"
        "    t.cancel()\n"
        "asyncio.run(main())\n"
    )
    first, second = out.splitlines()
    ok, freed, libc = first.split()
    if libc != "glibc":
        pytest.skip(f"malloc_trim is glibc's; this libc is {libc!r}")
    assert ok == "True" and int(freed) >= 15, out  # MB of the 40 freed
    assert second == "True"


def test_one_arena_keeps_threads_on_the_main_heap():
    """glibc gives a thread that mallocs an arena of its own: a 64 MB-aligned reservation
    (HEAP_MAX_SIZE) whose touched part stays resident. After memtrim.one_arena() a
    thread's allocations come from the main heap and no such mapping appears; without it
    one does (the check that the test can tell)."""
    code = """
import ctypes, sys, threading
from agent import memtrim
if sys.argv[1] == "one":
    assert memtrim.one_arena()
def arenas():
    out = set()
    for line in open("/proc/self/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo % (64 << 20) == 0 and line.split()[1] in ("rw-p", "---p"):
            out.add(lo)
    return out
before = arenas()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def work():
    for _ in range(50):
        libc.malloc(4096)  # small: from an arena, not mmap'd on its own
t = threading.Thread(target=work)
t.start(); t.join()
print(len(arenas() - before))
"""
    one = _run(code, "one")
    default = _run(code, "default")
    assert one == "0"
    assert default != "0", "glibc gave the thread no arena of its own: the test cannot tell"


def test_the_heap_is_trimmed_when_the_resident_set_has_grown(monkeypatch):
    """memtrim.run(grown=...): a trim as soon as the resident set is `grown` over what the
    last trim left (the smallest seen since, as connections close), not only every
    `interval`; growth that stays after a trim brings no second trim."""
    import asyncio

    from agent import memtrim

    if memtrim._trim is None:
        pytest.skip("this libc has no malloc_trim")
    mb = 1 << 20
    # What /proc/self/statm says at each look: the floor at start, growth under 1 MB,
    # a burst (trim), what stays after it (no trim), a drop, then 1 MB over the drop.
    seen = iter(
        [
            100 * mb,
            100 * mb + mb // 2,
            102 * mb,
            101 * mb,
            101 * mb + mb // 2,
            99 * mb,
            99 * mb + mb // 2,
            100 * mb,
        ]
    )
    looks: list[int] = []
    done = asyncio.Event()

    def rss() -> int:
        try:
            looks.append(next(seen))
        except StopIteration:
            done.set()
            return looks[-1]
        return looks[-1]

    trims: list[int] = []
    monkeypatch.setattr(memtrim, "rss_bytes", rss)
    monkeypatch.setattr(memtrim, "trim", lambda: trims.append(len(looks)) or True)

    async def main() -> None:
        task = asyncio.ensure_future(memtrim.run(3600, grown=mb, check=0))
        await done.wait()
        task.cancel()

    asyncio.run(main())
    # Looks 3 (102: 2 MB over 100) and 8 (100: 1 MB over the 99 seen after the drop)
    # trim; each trim is followed by one look (what it left: 101, then what remains).
    assert trims == [3, 8], (trims, looks)
