"""`weft policy`: validate, apply, get and delete mesh configuration.

Resources are the same YAML you would give kubectl: AuthorizationPolicy and
PeerAuthentication (security.istio.io), HTTPRoute (gateway.networking.k8s.io) and weft's
own weft.dev kinds. `validate` works offline, with the same checks the controller runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from agent.cli.output import Format, OutputOption, emit
from agent.cli.targets import ControllerSocketOption, LabOption, admin_stub, call
from controller.errors import WeftError
from controller.model.base import kind_named
from controller.model.loader import duplicates, parse_text
from controller.model.problems import InvalidConfig, Problem

app = typer.Typer(
    help="Mesh policy: AuthorizationPolicy, HTTPRoute, weft.dev kinds.", no_args_is_help=True
)

NamespaceOption = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        "-n",
        help="Namespace of documents that name none (as kubectl's -n); default: default.",
    ),
]

FileOption = Annotated[
    list[Path],
    typer.Option(
        "--file", "-f", help="A YAML file or a directory of them (repeatable); - for stdin."
    ),
]


# Policy files are small (a large mesh's config is a few MiB in all); these bound what one
# file and one apply may be, so a mistake (a log file, a data dump) is named, not sent.
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_APPLY_BYTES = 16 * 1024 * 1024


def _documents(paths: list[Path]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    too_big: list[Problem] = []

    def add(name: str, size: int, read: Callable[[], str]) -> None:
        if size > MAX_FILE_BYTES:
            what = f"{size / 1048576:.1f} MiB" if size > MAX_FILE_BYTES + 1 else "more than that"
            too_big.append(
                Problem(
                    f"{what} is over the {MAX_FILE_BYTES >> 20} MiB limit for one policy "
                    "file; split it",
                    file=name,
                )
            )
        else:
            out.append((name, read()))

    for p in paths:
        if str(p) == "-":
            stdin = sys.stdin.read(MAX_FILE_BYTES + 1)

            def given(t: str = stdin) -> str:
                return t

            add("<stdin>", len(stdin.encode()), given)
        elif p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml", ".json")):
                add(str(f), f.stat().st_size, f.read_text)
        elif p.exists():
            add(str(p), p.stat().st_size, p.read_text)
        else:
            raise InvalidConfig([Problem("no such file or directory", file=str(p))])
    if too_big:
        raise InvalidConfig(too_big)
    if not out:
        raise InvalidConfig([Problem("no YAML files found", file=", ".join(map(str, paths)))])
    total = sum(len(text.encode()) for _, text in out)
    if total > MAX_APPLY_BYTES:
        raise InvalidConfig(
            [
                Problem(
                    f"these {len(out)} files are {total / 1048576:.1f} MiB together, over the "
                    f"{MAX_APPLY_BYTES >> 20} MiB limit for one apply; apply them in parts",
                    file=", ".join(n for n, _ in out[:3]) + (", ..." if len(out) > 3 else ""),
                )
            ]
        )
    return out


def _problem_rows(problems: list[Problem]) -> list[dict[str, object]]:
    return [p.to_dict() for p in problems]


@app.command()
def validate(
    file: FileOption, namespace: NamespaceOption = None, output: Format = OutputOption
) -> None:
    """Check resources offline, exactly as the controller would. Exit 2 if any is invalid.

    Example: weft policy validate -f policies/
    """
    problems: list[Problem] = []
    resources = []
    offers = []
    for name, text in _documents(file):
        offer = parse_text(text, name, default_namespace=namespace)
        offers.append(offer)
        problems += offer.problems
        resources += offer.resources
    problems += duplicates(offers)
    rows = [
        {"kind": r.KIND, "namespace": r.namespace, "name": r.name, "valid": True} for r in resources
    ]
    if output is not Format.table:
        emit({"valid": rows, "problems": _problem_rows(problems)}, output)
    else:
        for r in rows:
            typer.echo(f"ok      {r['kind']} {r['namespace']}/{r['name']}")
    if problems:
        raise InvalidConfig(problems)


@app.command()
def convert(
    file: FileOption,
    namespace: NamespaceOption = None,
    lab: LabOption = "weft",
    controller_socket: ControllerSocketOption = None,
) -> None:
    """Print the Gateway API and weft.dev resources that Istio VirtualServices and
    DestinationRules become (what weft enforces for them), as YAML.

    The Services they name come from the files given, else from the controller when one is
    running (the lab's, or --controller-socket).

    Example: weft policy convert -f reviews-virtualservice.yaml -f reviews-destinationrule.yaml
    """
    from controller.model.derived import documents

    problems: list[Problem] = []
    resources = []
    for name, text in _documents(file):
        offer = parse_text(text, name, default_namespace=namespace)
        problems += offer.problems
        resources += offer.resources
    if problems:
        raise InvalidConfig(problems)
    have = {(r.namespace, r.name) for r in resources if r.KIND == "Service"}
    services = _controller_services(lab, controller_socket, have)
    docs, derive_problems = documents([*resources, *services])
    if derive_problems:
        raise InvalidConfig(
            derive_problems,
            hint="pass the Services they name with -f, or run against the controller that "
            "holds them (--lab, --controller-socket)",
        )
    for d in docs:
        d.pop("status", None)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))


def _controller_services(
    lab: str, controller_socket: Path | None, have: set[tuple[str, str]]
) -> list[Any]:
    """The controller's Services (for hosts the files do not define); none when no
    controller is reachable."""
    from controller.model.base import parse_resource

    try:
        from controller.api.gen import admin_pb2

        stub = admin_stub(lab, controller_socket)
        resp = call(stub.Get, admin_pb2.GetRequest(kind="Service", namespace="", name=""))
    except WeftError:
        return []
    out = []
    for r in resp.resources:
        svc = parse_resource(json.loads(r.body))
        if (svc.namespace, svc.name) not in have:
            out.append(svc)
    return out


@app.command()
def apply(
    file: FileOption,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate on the controller, change nothing.")
    ] = False,
    namespace: NamespaceOption = None,
    lab: LabOption = "weft",
    controller_socket: ControllerSocketOption = None,
    output: Format = OutputOption,
) -> None:
    """Store resources in the controller (all or nothing) and push them to every agent.

    Example: weft policy apply -f canary.yaml
    """
    from controller.api.gen import admin_pb2

    docs = [
        admin_pb2.ApplyRequest.Document(file=name, text=text) for name, text in _documents(file)
    ]
    stub = admin_stub(lab, controller_socket)
    resp = call(
        stub.Apply,
        admin_pb2.ApplyRequest(documents=docs, dry_run=dry_run, namespace=namespace or ""),
    )
    if resp.problems:
        raise InvalidConfig(
            [
                Problem(
                    p.reason,
                    file=p.file or None,
                    line=p.line or None,
                    resource=p.resource or None,
                    field=p.field or None,
                )
                for p in resp.problems
            ],
            hint="nothing was applied; fix these and apply again",
        )
    rows = [
        {"kind": a.kind, "namespace": a.namespace, "name": a.name, "action": a.action}
        for a in resp.applied
    ]
    warnings = [{"resource": w.resource, "reason": w.reason} for w in resp.warnings]
    if output is Format.table:
        for r in rows:
            suffix = " (dry run)" if dry_run else ""
            typer.echo(f"{r['kind'].lower()}/{r['namespace']}/{r['name']} {r['action']}{suffix}")
        typer.echo(f"revision {resp.revision}")
        for w in warnings:
            typer.echo(f"warning: {w['resource']}: {w['reason']}", err=True)
    else:
        emit(
            {"applied": rows, "revision": resp.revision, "dryRun": dry_run, "warnings": warnings},
            output,
        )


@app.command()
def get(
    kind: Annotated[
        str | None, typer.Argument(help="Kind (e.g. httproutes); all if omitted.")
    ] = None,
    name: Annotated[str | None, typer.Argument(help="Name.")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
    lab: LabOption = "weft",
    controller_socket: ControllerSocketOption = None,
    output: Format = OutputOption,
) -> None:
    """List stored resources, or show one.

    Examples: weft policy get; weft policy get httproute llm-canary -n ai -o yaml
    """
    if kind and kind_named(kind) is None:
        raise InvalidConfig([Problem(f"unknown kind {kind!r}")])
    from controller.api.gen import admin_pb2

    stub = admin_stub(lab, controller_socket)
    resp = call(
        stub.Get, admin_pb2.GetRequest(kind=kind or "", namespace=namespace or "", name=name or "")
    )
    docs = []
    for r in resp.resources:
        doc = json.loads(r.body)
        if r.conditions:
            # As the API server shows them: status.conditions on the resource.
            doc["status"] = {
                "conditions": [
                    {
                        "type": c.type,
                        "status": "True" if c.status else "False",
                        "reason": c.reason,
                        "message": c.message,
                    }
                    for c in r.conditions
                ]
            }
        docs.append(doc)
    if output is Format.table:
        emit(
            None,
            output,
            columns=[
                ("KIND", "kind"),
                ("NAMESPACE", "namespace"),
                ("NAME", "name"),
                ("REVISION", "revision"),
                ("SOURCE", "source"),
                ("STATUS", "status"),
            ],
            rows=[
                {
                    "kind": r.kind,
                    "namespace": r.namespace,
                    "name": r.name,
                    "revision": r.revision,
                    "source": r.source,
                    "status": ", ".join(c.reason for c in r.conditions if not c.status)
                    or ("Accepted" if r.conditions else "-"),
                }
                for r in resp.resources
            ],
        )
    elif output is Format.yaml:
        sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    else:
        emit(docs if not name else (docs[0] if docs else None), output)
    if name and not docs:
        from controller.errors import NotFound

        raise NotFound(f"no {kind} {namespace + '/' if namespace else ''}{name}")


@app.command()
def delete(
    ref: Annotated[str, typer.Argument(help="KIND/NAME or KIND/NAMESPACE/NAME.")],
    namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
    lab: LabOption = "weft",
    controller_socket: ControllerSocketOption = None,
) -> None:
    """Delete a resource that was stored with `weft policy apply`.

    Example: weft policy delete authorizationpolicy/ai/deny-batch
    """
    parts = ref.split("/")
    if len(parts) == 2:
        kind, name = parts
    elif len(parts) == 3:
        kind, namespace, name = parts
    else:
        raise InvalidConfig([Problem(f"{ref!r}: expected KIND/NAME or KIND/NAMESPACE/NAME")])
    cls = kind_named(kind)
    if cls is None:
        raise InvalidConfig([Problem(f"unknown kind {kind!r}")])
    from controller.api.gen import admin_pb2

    stub = admin_stub(lab, controller_socket)
    resp = call(
        stub.Delete, admin_pb2.DeleteRequest(kind=cls.KIND, namespace=namespace or "", name=name)
    )
    if not resp.deleted:
        from controller.errors import NotFound

        raise NotFound(f"no {cls.KIND} {namespace or cls.DEFAULT_NAMESPACE}/{name}")
    typer.echo(
        f"{cls.KIND.lower()}/{namespace or cls.DEFAULT_NAMESPACE}/{name} deleted "
        f"(revision {resp.revision})"
    )
