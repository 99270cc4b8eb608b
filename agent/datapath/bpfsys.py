"""The bpf(2) system call, thinly: maps, programs, pins, cgroup attachments, queries.

Why not bcc's Python `Table`/`attach_func` or libbpf's C API: bcc's `Table` cannot open a
SOCKHASH and needs a live compiled module, and libbpf's option structs change between
versions. The system call's `union bpf_attr` is kernel ABI and never changes shape, so the
loader speaks it directly; bcc is only the compiler (see compiler.py).

Every function raises `BpfError` (an OSError carrying errno) on failure. File descriptors
returned are owned by the caller (close them with os.close).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}

# Commands (enum bpf_cmd).
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
MAP_GET_FD_BY_ID = 14
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
LINK_CREATE = 28
LINK_UPDATE = 29

# Map types (enum bpf_map_type) that weft uses.
MAP_HASH = 1
MAP_ARRAY = 2
MAP_PERCPU_HASH = 5
MAP_PERCPU_ARRAY = 6
MAP_LRU_HASH = 9
MAP_LPM_TRIE = 11
MAP_SOCKHASH = 18
PERCPU_MAP_TYPES = frozenset({MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, 10})  # 10: LRU_PERCPU_HASH

# Program types (enum bpf_prog_type).
PROG_CGROUP_SKB = 8
PROG_SOCK_OPS = 13
PROG_SK_MSG = 16
PROG_CGROUP_SOCK_ADDR = 18
PROG_CGROUP_SOCKOPT = 25
PROG_SK_LOOKUP = 30

# Attach types (enum bpf_attach_type).
ATTACH_CGROUP_INET_INGRESS = 0
ATTACH_CGROUP_INET_EGRESS = 1
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_SK_MSG_VERDICT = 7
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_GETSOCKOPT = 21
ATTACH_SK_LOOKUP = 36

# Flags.
F_NO_PREALLOC = 1
F_ALLOW_MULTI = 1 << 1
F_REPLACE = 1 << 2
ANY = 0
NOEXIST = 1

BPF_PSEUDO_MAP_FD = 1
OBJ_NAME_LEN = 16
_ATTR_SIZE = 144  # large enough for every command used here; the kernel zero-checks the tail


class BpfError(OSError):
    """A bpf(2) call failed; `.errno` is the kernel's answer, `.log` the verifier's."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.log = log


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _sys_bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2) number unknown for {platform.machine()}")
    ret = _libc.syscall(
        ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(ctypes.sizeof(attr))
    )
    if ret < 0:
        raise BpfError(ctypes.get_errno(), what)
    return int(ret)


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(_ATTR_SIZE)


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


@cache
def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values (not os.cpu_count())."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


# ---- maps ------------------------------------------------------------------------------


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, flags: int, name: str
) -> int:
    attr = _attr()
    struct.pack_into(
        "=IIIIIII16s",
        attr,
        0,
        map_type,
        key_size,
        value_size,
        max_entries,
        flags,
        0,  # inner_map_fd
        0,  # numa_node
        name.encode()[: OBJ_NAME_LEN - 1],
    )
    return _sys_bpf(MAP_CREATE, attr, f"create map {name}")


def _elem_attr(
    fd: int, key: ctypes.Array[ctypes.c_char] | None, value_addr: int, flags: int
) -> ctypes.Array[ctypes.c_char]:
    attr = _attr()
    struct.pack_into("=I4xQQQ", attr, 0, fd, _addr(key), value_addr, flags)
    return attr


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _sys_bpf(MAP_LOOKUP_ELEM, _elem_attr(fd, k, _addr(v), 0), "map lookup")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _sys_bpf(MAP_UPDATE_ELEM, _elem_attr(fd, k, _addr(v), flags), "map update")


def map_delete(fd: int, key: bytes) -> bool:
    """Delete a key; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _sys_bpf(MAP_DELETE_ELEM, _elem_attr(fd, k, 0, 0), "map delete")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key, in the kernel's order. Keys deleted meanwhile may restart the walk (hash
    maps return the first key again for a vanished one), so callers must tolerate repeats."""
    seen: set[bytes] = set()
    prev: ctypes.Array[ctypes.c_char] | None = None
    while True:
        nxt = ctypes.create_string_buffer(key_size)
        try:
            _sys_bpf(MAP_GET_NEXT_KEY, _elem_attr(fd, prev, _addr(nxt), 0), "map next key")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        raw = nxt.raw
        if raw in seen:
            return
        seen.add(raw)
        yield raw
        prev = nxt


# ---- programs --------------------------------------------------------------------------


def prog_load(
    prog_type: int,
    insns: bytes,
    name: str,
    *,
    expected_attach_type: int = 0,
    license: str = "GPL",
    log_size: int = 1 << 22,
) -> int:
    """Load a program; on a verifier rejection the error carries the verifier's log."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    attempt_log = 0
    while True:
        log = ctypes.create_string_buffer(log_size if attempt_log else 1)
        attr = _attr()
        struct.pack_into(
            "=IIQQIIQII16sII",
            attr,
            0,
            prog_type,
            len(insns) // 8,
            _addr(code),
            _addr(lic),
            attempt_log,  # log_level: 0 first (fast), 1 on failure to explain it
            log_size if attempt_log else 0,
            _addr(log) if attempt_log else 0,
            0,  # kern_version
            0,  # prog_flags
            name.encode()[: OBJ_NAME_LEN - 1],
            0,  # prog_ifindex
            expected_attach_type,
        )
        try:
            return _sys_bpf(PROG_LOAD, attr, f"load program {name}")
        except BpfError as e:
            if attempt_log or e.errno in (errno.EPERM, errno.E2BIG):
                text = log.value.decode(errors="replace") if attempt_log else ""
                raise BpfError(e.errno or 0, f"load program {name}", text[-8000:]) from None
            attempt_log = 1


# ---- pins ------------------------------------------------------------------------------


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    attr = _attr()
    struct.pack_into("=QI", attr, 0, _addr(p), fd)
    _sys_bpf(OBJ_PIN, attr, f"pin {path}")


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(path.encode())
    attr = _attr()
    struct.pack_into("=QI", attr, 0, _addr(p), 0)
    return _sys_bpf(OBJ_GET, attr, f"open pin {path}")


# ---- attachments -----------------------------------------------------------------------


def prog_attach(
    prog_fd: int, target_fd: int, attach_type: int, flags: int = 0, replace_fd: int = 0
) -> None:
    attr = _attr()
    struct.pack_into("=IIIII", attr, 0, target_fd, prog_fd, attach_type, flags, replace_fd)
    _sys_bpf(PROG_ATTACH, attr, f"attach program (type {attach_type})")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A bpf link attaching the program to `target_fd` (a network namespace for sk_lookup);
    the attachment lives as long as the link (pin it to outlive the process)."""
    attr = _attr()
    struct.pack_into("=IIII", attr, 0, prog_fd, target_fd, attach_type, 0)
    return _sys_bpf(LINK_CREATE, attr, f"create link (attach type {attach_type})")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program of an existing link (a new build), atomically."""
    attr = _attr()
    struct.pack_into("=III", attr, 0, link_fd, prog_fd, 0)
    _sys_bpf(LINK_UPDATE, attr, "update link")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    attr = _attr()
    struct.pack_into("=III", attr, 0, target_fd, prog_fd, attach_type)
    _sys_bpf(PROG_DETACH, attr, f"detach program (type {attach_type})")


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to a cgroup for one attach type."""
    count = 64
    ids = (ctypes.c_uint32 * count)()
    attr = _attr()
    struct.pack_into("=IIIIQI", attr, 0, target_fd, attach_type, 0, 0, ctypes.addressof(ids), count)
    _sys_bpf(PROG_QUERY, attr, f"query cgroup programs (type {attach_type})")
    (got,) = struct.unpack_from("=I", attr, 24)
    return list(ids[: min(got, count)])


def prog_fd_by_id(prog_id: int) -> int:
    attr = _attr()
    struct.pack_into("=I", attr, 0, prog_id)
    return _sys_bpf(PROG_GET_FD_BY_ID, attr, f"open program id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    attr = _attr()
    struct.pack_into("=I", attr, 0, map_id)
    return _sys_bpf(MAP_GET_FD_BY_ID, attr, f"open map id {map_id}")


# ---- introspection ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def _info(fd: int, buf: ctypes.Array[ctypes.c_char], what: str) -> bytes:
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, fd, ctypes.sizeof(buf), ctypes.addressof(buf))
    _sys_bpf(OBJ_GET_INFO_BY_FD, attr, what)
    return buf.raw


def prog_info(fd: int) -> ProgInfo:
    # struct bpf_prog_info: type@0 id@4 ... nr_map_ids@52 map_ids@56 name@64 (80 bytes)
    raw = _info(fd, ctypes.create_string_buffer(80), "program info")
    ptype, pid = struct.unpack_from("=II", raw, 0)
    (nr_maps,) = struct.unpack_from("=I", raw, 52)
    name = raw[64:80].split(b"\0", 1)[0].decode()
    map_ids: tuple[int, ...] = ()
    if nr_maps:
        ids = (ctypes.c_uint32 * nr_maps)()
        buf = ctypes.create_string_buffer(80)
        struct.pack_into("=IQ", buf, 52, nr_maps, ctypes.addressof(ids))
        _info(fd, buf, "program map ids")
        map_ids = tuple(ids)
    return ProgInfo(id=pid, type=ptype, name=name, map_ids=map_ids)


def map_info(fd: int) -> MapInfo:
    # struct bpf_map_info: type id key_size value_size max_entries map_flags name[16]
    raw = _info(fd, ctypes.create_string_buffer(40), "map info")
    mtype, mid, ks, vs, me, fl = struct.unpack_from("=IIIIII", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(mid, mtype, ks, vs, me, fl, name)
