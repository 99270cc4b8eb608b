"""`weft lab`: build, inspect, enter and remove the one-machine lab."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from agent.cli.output import Format, OutputOption, emit
from agent.lab import mesh
from agent.lab.manifest import load_manifest
from agent.lab.topology import Lab, LabState, all_lab_names

DEFAULT_LAB = os.environ.get("WEFT_LAB", "weft")

app = typer.Typer(
    help="Build a mesh lab on this machine: nodes and pods as network namespaces and cgroups.",
    no_args_is_help=True,
)

LabOption = Annotated[
    str, typer.Option("--lab", envvar="WEFT_LAB", help="Lab name (a machine can hold several).")
]


@app.command()
def up(
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="Lab manifest (YAML). Default: the shipped 2-node lab."),
    ] = None,
    mesh_on: Annotated[
        bool,
        typer.Option("--mesh/--no-mesh", help="Also start the controller and an agent per node."),
    ] = True,
    output: Format = OutputOption,
) -> None:
    """Build the lab described by a manifest (replacing any leftovers of the same lab),
    and install the mesh on it.

    Examples:\n
      weft lab up\n
      weft lab up --no-mesh -f my-lab.yaml -o json
    """
    plan = load_manifest(file)
    lab = Lab(plan.name)
    state = lab.up(plan)
    if mesh_on:
        try:
            mesh.install(lab, state)
        except BaseException:
            lab.down()
            raise
        state = lab.state()
    _show(state, output)


@app.command()
def status(lab: LabOption = DEFAULT_LAB, output: Format = OutputOption) -> None:
    """List the lab's nodes and pods with addresses, identities and cgroups.

    Example: weft lab status -o json
    """
    _show(Lab(lab).state(), output)


@app.command(
    "exec",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def exec_(
    pod: Annotated[str, typer.Argument(help="Pod as namespace/name, or a name unique in the lab.")],
    command: Annotated[list[str], typer.Argument(help="Command and arguments (after --).")],
    lab: LabOption = DEFAULT_LAB,
) -> None:
    """Run a command inside a pod's network namespace and cgroup; exits with its code.

    Example: weft lab exec apps/client -- python3 -c 'print(1)'
    """
    raise typer.Exit(Lab(lab).exec(pod, command))


@app.command()
def down(
    lab: LabOption = DEFAULT_LAB,
    all_labs: Annotated[
        bool, typer.Option("--all", help="Remove every lab on this machine.")
    ] = False,
) -> None:
    """Remove every namespace, link, cgroup, pinned map and process of the lab. Idempotent."""
    names = all_lab_names() if all_labs else [lab]
    for name in names:
        for what in Lab(name).down():
            typer.echo(f"removed {what}")


restart_app = typer.Typer(
    help="Restart the mesh's processes the way Kubernetes rolls them, under traffic.",
    no_args_is_help=True,
)
app.add_typer(restart_app, name="restart")

KillOption = Annotated[
    bool,
    typer.Option("--kill", help="SIGKILL the running process first (a crash), then start."),
]


@restart_app.command("agent")
def restart_agent(
    node: Annotated[str, typer.Option("--node", help="The node whose agent restarts.")],
    kill: KillOption = False,
    lab: LabOption = DEFAULT_LAB,
) -> None:
    """Start a new agent on the node, which takes over from the running one (listeners,
    data path, identities) while the old one drains; as a DaemonSet rolling update does.

    Examples:\n
      weft lab restart agent --node node-1\n
      weft lab restart agent --node node-2 --kill
    """
    env = Lab(lab)
    old, new = mesh.restart_agent(env, env.state(), node, kill=kill)
    verb = "killed" if kill else "draining"
    typer.echo(f"agent on {node}: process {new} serving; process {old} {verb}")


@restart_app.command("waypoint")
def restart_waypoint(
    pod: Annotated[str, typer.Argument(help="The waypoint's pod, namespace/name.")],
    kill: KillOption = False,
    lab: LabOption = DEFAULT_LAB,
) -> None:
    """Start a new waypoint process in the pod, then drain the old one once the new one is
    ready; as a Deployment rolling update does.

    Example: weft lab restart waypoint mesh/waypoint
    """
    env = Lab(lab)
    state = env.state()
    key = state.pod(pod).key
    old, new = mesh.restart_waypoint(env, state, key, kill=kill)
    verb = "killed" if kill else "draining"
    typer.echo(f"waypoint {key}: process {new} serving; process {old} {verb}")


def _show(state: LabState, fmt: Format) -> None:
    if fmt is not Format.table:
        emit(state_dict(state), fmt)
        return
    emit(
        None,
        fmt,
        columns=[("NODE", "name"), ("IP", "ip"), ("POD CIDR", "pod_cidr"), ("NETNS", "netns")],
        rows=[n.__dict__ for n in state.nodes],
    )
    typer.echo("")
    emit(
        None,
        fmt,
        columns=[
            ("POD", "key"),
            ("NODE", "node"),
            ("IP", "ip"),
            ("SERVICE ACCOUNT", "service_account"),
            ("MESHED", "meshed"),
            ("LABELS", "labels"),
            ("CGROUP", "cgroup"),
        ],
        rows=[{**p.__dict__, "key": p.key} for p in state.pods],
    )


def state_dict(state: LabState) -> dict[str, object]:
    return {
        "name": state.name,
        "trustDomain": state.trust_domain,
        "fabric": {
            "netns": state.fabric_netns,
            "ip": state.fabric_ip,
            "network": state.node_network,
        },
        "nodes": [
            {
                "name": n.name,
                "ip": n.ip,
                "podCIDR": n.pod_cidr,
                "netns": n.netns,
                "cgroup": n.cgroup,
            }
            for n in state.nodes
        ],
        "pods": [
            {
                "name": p.name,
                "namespace": p.namespace,
                "node": p.node,
                "ip": p.ip,
                "serviceAccount": p.service_account,
                "labels": p.labels,
                "meshed": p.meshed,
                "netns": p.netns,
                "cgroup": p.cgroup,
                "cgroupId": p.cgroup_id,
            }
            for p in state.pods
        ],
        "services": state.services,
        "processes": [{"name": p.name, "pid": p.pid, "log": p.log} for p in state.processes],
    }
