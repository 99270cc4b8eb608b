"""weft's eBPF data path: programs in bpf/, loaded and driven from here.

compiler   bcc -> relocatable bytecode, cached by hash
bpfsys     the bpf(2) calls the loader needs
loader     Datapath: pins, attachments, configuration, reading
abi        map key/value layouts shared with bpf/lib/common.h
reasons    drop reasons and counters shared with bpf/lib/{drop,counters}.h
preflight  host checks with the fix for each
"""

from agent.datapath.loader import (
    Datapath,
    Flow,
    OriginalDestination,
    PodAttachment,
    StartReport,
    uninstall,
    unix_time,
)
from agent.datapath.reasons import Counter, DropReason
from agent.datapath.settings import DatapathSettings, MapSizes

__all__ = [
    "Counter",
    "Datapath",
    "DatapathSettings",
    "DropReason",
    "Flow",
    "MapSizes",
    "OriginalDestination",
    "PodAttachment",
    "StartReport",
    "uninstall",
    "unix_time",
]
