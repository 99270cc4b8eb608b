"""weft node agent: eBPF data path loader, HBONE tunnel, waypoint, identity, config client."""

__version__ = "0.1.0"
