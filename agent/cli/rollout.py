"""`weft rollout status`: where each canary rollout stands.

Rollouts the controller judges (analysis.provider: prometheus) have a RolloutState that the
controller publishes: phase, step, the canary's weight, what it waits for, the last
events. Rollouts judged in each waypoint (provider: waypoint) have none at the controller:
each waypoint replica reports its own at :15020/rollouts.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from agent.cli.output import Format, OutputOption, emit
from agent.cli.targets import ControllerSocketOption, LabOption, admin_stub, call

app = typer.Typer(help="Canary rollouts (Rollout): where they stand.", no_args_is_help=True)


def _get(stub: Any, kind: str, namespace: str | None, name: str | None) -> list[dict[str, Any]]:
    from controller.api.gen import admin_pb2

    resp = call(
        stub.Get, admin_pb2.GetRequest(kind=kind, namespace=namespace or "", name=name or "")
    )
    return [json.loads(r.body) for r in resp.resources]


@app.command()
def status(
    name: Annotated[str | None, typer.Argument(help="Rollout name; all if omitted.")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
    lab: LabOption = "weft",
    controller_socket: ControllerSocketOption = None,
    output: Format = OutputOption,
) -> None:
    """Phase, step, canary weight and the last event of each Rollout.

    Examples: weft rollout status; weft rollout status llm -n ai -o json
    """
    stub = admin_stub(lab, controller_socket)
    rollouts = _get(stub, "Rollout", namespace, name)
    if name and not rollouts:
        from controller.errors import NotFound

        raise NotFound(f"no Rollout {namespace + '/' if namespace else ''}{name}")
    states = {
        (s["metadata"]["namespace"], s["metadata"]["name"]): s["spec"]
        for s in _get(stub, "RolloutState", namespace, name)
    }
    rows = []
    for r in rollouts:
        md, spec = r["metadata"], r["spec"]
        ns = md.get("namespace", "default")
        provider = spec.get("analysis", {}).get("provider", "waypoint")
        st = states.get((ns, md["name"]))
        row: dict[str, Any] = {
            "namespace": ns,
            "name": md["name"],
            "judgedBy": "controller" if provider == "prometheus" else "each waypoint",
            "canary": spec["canary"]["name"],
        }
        if st is not None:
            row.update(
                {
                    "phase": st["phase"],
                    "step": f"{st['step'] + 1}/{len(spec['steps'])}",
                    "canaryWeight": st["canaryWeight"],
                    "waitingFor": st.get("waitingFor") or "-",
                    "lastEvent": (st.get("events") or ["-"])[-1],
                    "lastAnalysis": st.get("lastAnalysis"),
                    "events": st.get("events", []),
                }
            )
        else:
            row.update(
                {
                    "phase": "-",
                    "step": "-",
                    "canaryWeight": "-",
                    "waitingFor": "-",
                    "lastEvent": "judged in each waypoint replica: GET :15020/rollouts"
                    if provider == "waypoint"
                    else "not judged yet",
                }
            )
        rows.append(row)
    if output is Format.table:
        emit(
            None,
            output,
            columns=[
                ("NAMESPACE", "namespace"),
                ("NAME", "name"),
                ("JUDGED BY", "judgedBy"),
                ("PHASE", "phase"),
                ("STEP", "step"),
                ("CANARY %", "canaryWeight"),
                ("WAITING FOR", "waitingFor"),
                ("LAST EVENT", "lastEvent"),
            ],
            rows=rows,
        )
    else:
        emit(rows if not name else rows[0], output)
