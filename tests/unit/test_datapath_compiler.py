"""What the compiler hands bcc, and the map layouts user space assumes (no kernel needed)."""

from __future__ import annotations

import re
from pathlib import Path

from agent.datapath import abi, compiler
from agent.datapath.settings import SOURCE_DIR, DatapathSettings, MapSizes


def test_translation_unit_inlines_each_header_once_with_line_markers():
    """bcc rewrites map calls only in the file it is given, so every bpf/lib header must
    be inlined (once), and #line markers keep diagnostics pointing at the real files."""
    tu = compiler.translation_unit(SOURCE_DIR)
    assert not re.search(r'^\s*#\s*include\s+"', tu, re.M)
    headers = sorted(p.resolve() for p in (SOURCE_DIR / "lib").glob("*.h"))
    for h in headers:
        assert tu.count(f'#line 1 "{h}"') == 1, h
    assert tu.startswith(f'#line 1 "{(SOURCE_DIR / "weft.c").resolve()}"')


def test_settings_become_d_flags():
    s = DatapathSettings(tunnel_ip="10.0.0.11", flow_sample_ms=50, map_sizes=MapSizes(flows=128))
    flags = s.cflags()
    assert "-DWEFT_FLOWS_MAX=128" in flags
    assert "-DWEFT_FLOW_SAMPLE_NS=50000000ULL" in flags
    # Every flag is one config.h knows, so a typo cannot silently do nothing.
    config = (SOURCE_DIR / "lib" / "config.h").read_text()
    for f in flags:
        name = f[2:].split("=", 1)[0]
        assert f"#ifndef {name}" in config, name


def test_cache_key_changes_with_flags(tmp_path: Path):
    a = DatapathSettings(tunnel_ip="10.0.0.11", cache_dir=tmp_path)
    b = DatapathSettings(tunnel_ip="10.0.0.12", cache_dir=tmp_path)
    c = DatapathSettings(tunnel_ip="10.0.0.11", cache_dir=tmp_path, flow_sample_ms=10)
    names = ("weft_connect4",)
    # The tunnel address is runtime configuration (a map), not a compile input.
    assert compiler.artifact_key(a, names) == compiler.artifact_key(b, names)
    assert compiler.artifact_key(a, names) != compiler.artifact_key(c, names)


def test_relocation_patches_map_fds():
    insns = bytes(16) + bytes(8)
    spec = compiler.ProgramSpec("p", insns, ((0, "m"),))
    out = spec.relocated({"m": 7})
    assert out[4:8] == (7).to_bytes(4, "little") and out[8:] == insns[8:]


def test_layouts_match_the_c_struct_sizes_by_reading_common_h():
    """A cheap guard before the kernel test: every struct in abi.py has the size its
    field list in common.h adds up to (no implicit padding allowed there)."""
    sizes = {"__u64": 8, "__u32": 4, "__be32": 4, "__u16": 2, "__u8": 1}
    text = (SOURCE_DIR / "lib" / "common.h").read_text()
    structs = dict(re.findall(r"struct (weft_\w+) \{(.*?)\};", text, re.S))

    def size(name: str) -> int:
        total = 0
        for t, _field, count in re.findall(r"(__\w+|char) (\w+)(?:\[(\w+)\])?;", structs[name]):
            n = {"WEFT_CGROUP_PATH_MAX": abi.CGROUP_PATH_MAX}.get(count, count)
            total += sizes.get(t, 1) * (int(n) if n else 1)
        return total

    assert size("weft_node_config") == abi.NODE_CONFIG.size
    assert size("weft_pod_config") == abi.POD_CONFIG.size
    assert size("weft_port_key") == abi.PORT_KEY.size
    assert size("weft_cidr_key") == abi.CIDR_KEY.size
    assert size("weft_origdst") == abi.ORIGDST.size
    assert size("weft_sock_key") == abi.SOCK_KEY.size
    assert size("weft_fastpath_sock") == abi.FASTPATH_SOCK.size
    assert size("weft_flow") == abi.FLOW.size
    assert size("weft_drop_key") == abi.DROP_KEY.size
    assert size("weft_attachment") == abi.ATTACHMENT.size


def test_cidr_keys_round_trip():
    import ipaddress

    net = ipaddress.IPv4Network("10.96.0.0/12")
    key = abi.cidr_key(0x1_0000_0002, net)
    assert abi.cidr_from_key(key) == (0x1_0000_0002, net)
