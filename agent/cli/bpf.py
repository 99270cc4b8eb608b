"""`weft agent bpf`: look at the eBPF data path: the C it compiles, what it has attached,
its counters; and remove it from a node."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from agent.cli.output import Format, OutputOption, emit

app = typer.Typer(
    help="The agent's eBPF data path: print its C, show its state, uninstall it.",
    no_args_is_help=True,
)

PinRootOption = Annotated[
    Path,
    typer.Option(
        "--pin-root",
        envvar="WEFT_PIN_ROOT",
        help="The agent's bpffs directory (in the lab: /sys/fs/bpf/weft/<lab>/<node>).",
    ),
]
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/weft/agent")


@app.command()
def dump(
    joined: Annotated[
        bool,
        typer.Option(
            "--joined",
            help="Print weft.c with its headers inlined, before bcc's rewriter "
            "(needs neither root nor bcc).",
        ),
    ] = False,
    flow_sample_ms: Annotated[
        int, typer.Option(help="The agent's flow sampling interval (a -D flag).")
    ] = 100,
) -> None:
    """Print the C the agent compiles, after bcc's rewriter (map calls become
    bpf_pseudo_fd), with the -D flags it uses.

    Examples:\n
      weft agent bpf dump | less\n
      weft agent bpf dump --joined > /tmp/weft-joined.c
    """
    from agent.datapath import compiler, preflight
    from agent.datapath.settings import DatapathSettings

    settings = DatapathSettings(tunnel_ip="0.0.0.0", flow_sample_ms=flow_sample_ms)
    if joined:
        flags = " ".join(settings.cflags())
        sys.stdout.write(f"/* -D flags: {flags} */\n")
        sys.stdout.write(compiler.translation_unit(settings.source_dir))
        return
    preflight.privileges()
    preflight.bcc()
    preflight.kernel_headers()
    sys.stdout.write(compiler.preprocessed(settings))


@app.command()
def status(pin_root: PinRootOption = DEFAULT_PIN_ROOT, output: Format = OutputOption) -> None:
    """Attached pods, counters and drops of the agent pinned at --pin-root.

    Example: weft agent bpf status --pin-root /sys/fs/bpf/weft/weft/node-1 -o json
    """
    from agent.datapath import Datapath

    with Datapath.open_pins(pin_root) as dp:
        pods = [
            {
                "cgroup": p.cgroup,
                "cgroupId": p.cgroup_id,
                "ip": p.ip,
                "capture": p.capture,
                "strict": p.strict,
                "fastpath": p.fastpath,
                "inboundExceptionPorts": sorted(p.inbound_exception_ports),
                "excludedPorts": sorted(p.excluded_ports),
                "excludedCIDRs": sorted(p.excluded_cidrs),
            }
            for p in dp.attached_pods()
        ]
        counters = {c.name.lower(): v for c, v in dp.counters().items()}
        drops = [
            {"cgroupId": cg, "reason": getattr(r, "label", str(r)), "packets": n}
            for (cg, r), n in dp.drop_counters().items()
        ]
    if output is not Format.table:
        emit({"pods": pods, "counters": counters, "drops": drops}, output)
        return
    emit(
        None,
        output,
        columns=[
            ("CGROUP ID", "cgroupId"),
            ("IP", "ip"),
            ("CAPTURE", "capture"),
            ("STRICT", "strict"),
            ("FASTPATH", "fastpath"),
            ("CGROUP", "cgroup"),
        ],
        rows=pods,
    )
    typer.echo("")
    emit(
        None,
        output,
        columns=[("COUNTER", "name"), ("VALUE", "value")],
        rows=[{"name": k, "value": v} for k, v in counters.items()],
    )
    if drops:
        typer.echo("")
        emit(None, output, rows=drops)


@app.command()
def uninstall(pin_root: PinRootOption = DEFAULT_PIN_ROOT) -> None:
    """Detach every program the agent at --pin-root attached and remove its pins.

    Refuses while that agent runs. Established same-node connections fall back to TCP;
    bytes spliced but not yet read by the receiver are lost, so drain first.
    """
    from agent.datapath import uninstall as remove

    for line in remove(pin_root):
        typer.echo(line)
