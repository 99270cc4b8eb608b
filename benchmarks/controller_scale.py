"""Controller at scale: 10,000 workloads, 100 connected agents, one pod changes.

    python -m benchmarks.controller_scale [--quick] [--workloads N] [--agents N] [--workers N]
    python -m benchmarks --only controller-scale

The controller runs in this process, exactly as `weft-controller` runs it (Controller with
the files source, real mTLS gRPC on loopback). The agents are real ConfigClients, each with
its own NodeCredential (bootstrap token, node certificate, its own gRPC channel), spread over
a few worker processes so the controller's process does not also run them. The config is
one file per node (a Node and its share of the Workloads), as a lab or a Kubernetes source
would produce.

Measured:
- initial sync: from the workers' start until every agent has applied the full snapshot;
- one-pod change (repeated): a label of one Workload is edited in its file; the time until
  the controller's store has the new revision (its poll interval dominates: it waits for
  the next scan), and until every agent has applied a snapshot carrying the new label
  (p50 agent and the last one), plus each agent's own time to apply the delta;
- certificates signed per second: through CertificateAuthority.sign_workload directly (one
  thread, CSRs made beforehand), and through the real gRPC path (SignWorkloadCertificate
  over each node's mTLS channel, the node-to-workload check included) from every worker at
  once with several requests in flight each.

Workers talk to this process with JSON lines on stdin/stdout. Times are CLOCK_MONOTONIC,
which is one clock for all processes on a Linux machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

# The workers are started (fork + exec) while gRPC's threads run in this process; its fork
# handlers would only log that they are skipping themselves, once per worker.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

NS = "scale"
LABEL = "bench-rev"
Progress = Callable[[str], None]


def node_name(i: int) -> str:
    return f"n-{i:03d}"


def workload_name(i: int) -> str:
    return f"w-{i:05d}"


def config_docs(node: int, workloads: range, rev: int = 0, changed: int | None = None) -> str:
    """The YAML file for one node: its Node and the Workloads scheduled on it. `changed`
    names the one workload whose LABEL carries `rev`."""
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "Node",
            "metadata": {"name": node_name(node)},
            "spec": {"addresses": [f"10.1.{node // 250}.{node % 250 + 1}"]},
        }
    ]
    for i in workloads:
        labels = {"app": f"app-{i % 97}", "version": "v1"}
        if i == changed:
            labels[LABEL] = str(rev)
        docs.append(
            {
                "apiVersion": "weft.dev/v1alpha1",
                "kind": "Workload",
                "metadata": {"name": workload_name(i), "namespace": NS, "labels": labels},
                "spec": {
                    "serviceAccount": f"sa-{i % 50}",
                    "node": node_name(node),
                    "addresses": [f"10.{100 + i // 65000}.{(i // 250) % 256}.{i % 250 + 1}"],
                },
            }
        )
    return yaml.safe_dump_all(docs, sort_keys=False)


def _cpu_of(pid: int) -> float:
    """CPU seconds a live process has used (0 if it is gone)."""
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def _controller_cpu(c: Any) -> float:
    """CPU seconds of this process and the controller's signer processes so far."""
    total = time.process_time()
    for child in c.signer._children:
        if child.proc is not None and child.proc.returncode is None:
            total += _cpu_of(child.proc.pid)
    return total


def spread(total: int, parts: int) -> list[range]:
    """Split range(total) into `parts` contiguous near-equal ranges."""
    out, start = [], 0
    for p in range(parts):
        n = total // parts + (1 if p < total % parts else 0)
        out.append(range(start, start + n))
        start += n
    return out


# --------------------------------------------------------------------------- worker side


async def worker_main() -> None:
    """One worker process: its share of agents; commands and events as JSON lines."""
    from agent.config.client import ConfigClient
    from agent.identity.manager import SignBatcher
    from agent.identity.node import ControllerEndpoint, NodeCredential, TrustBundle
    from agent.identity.rpc import IDENTITY, RpcError
    from controller.api.gen import identity_pb2
    from controller.ca.spiffe import make_csr, new_key

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def emit(**kw: Any) -> None:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    spec = json.loads(await reader.readline())
    ep = ControllerEndpoint(
        address=spec["main"],
        bootstrap_address=spec["bootstrap"],
        server_name="localhost",
        ca_bundle_file=Path(spec["bundle"]),
    )
    target = spec["target"]  # [namespace, name] of the workload that will change
    tasks: list[asyncio.Task[Any]] = []
    creds: dict[str, NodeCredential] = {}
    apply_s: dict[str, list[float]] = {"full": [], "delta": []}

    def make_apply(node: str, client_ref: list[ConfigClient]) -> Callable[[Any], None]:
        seen_full = [False]

        def apply(snap: Any) -> None:
            now = time.monotonic()
            if not seen_full[0] and snap.revision > 0:
                seen_full[0] = True
                emit(
                    event="synced",
                    node=node,
                    t=now,
                    revision=snap.revision,
                    resources=len(snap.resources),
                )
            from controller.model.base import ResourceKey

            w = snap.resources.get(ResourceKey("Workload", target[0], target[1]))
            if w is not None:
                emit(
                    event="applied",
                    node=node,
                    t=now,
                    revision=snap.revision,
                    label=w.metadata.labels.get(LABEL),
                )

        return apply

    for node, token in spec["nodes"]:
        trust = TrustBundle()
        cred = NodeCredential(node, ep, trust, token=token)
        ref: list[ConfigClient] = []
        client = ConfigClient(cred, trust, make_apply(node, ref))
        ref.append(client)
        orig = client.apply_response

        async def timed(resp: Any, orig: Any = orig) -> None:
            t = time.perf_counter()
            await orig(resp)
            apply_s["full" if resp.full else "delta"].append(time.perf_counter() - t)

        client.apply_response = timed  # type: ignore[method-assign]
        creds[node] = cred
        tasks += [asyncio.create_task(cred.run()), asyncio.create_task(client.run())]

    # CSRs for the signing phase, made on the "prepare" command that precedes it: neither
    # the initial sync (whose CPU and time this worker's loop would otherwise share with
    # 1,250 ECDSA signatures) nor the signing rate counts them.
    csrs: dict[str, list[tuple[str, str, bytes]]] = {}

    def make_csrs() -> None:
        key = new_key()
        for node, ids in spec["identities"].items():  # node -> [[ns, sa], ...]
            csrs[node] = [
                (ns, sa, make_csr(key, f"spiffe://cluster.local/ns/{ns}/sa/{sa}")) for ns, sa in ids
            ]

    async def sign(n: int, in_flight: int, batched: bool) -> None:
        """n certificates with `in_flight` requests outstanding: one SignWorkloadCertificate
        call each, or (batched) through the agent's own SignBatcher, which puts what is
        asked in the same turn into one SignWorkloadCertificates call."""
        await asyncio.gather(*(c.ready.wait() for c in creds.values()))
        if not csrs:
            raise RuntimeError("sign before prepare: this worker has made no CSRs")
        nodes = list(creds)
        channels = {nd: creds[nd].channel() for nd in nodes}
        batchers = {nd: SignBatcher(creds[nd]) for nd in nodes}
        counter = iter(range(n))
        errors = 0
        first_error = ""

        async def one_worker() -> None:
            nonlocal errors, first_error
            for i in counter:
                # `in_flight` requests in a row from one node, as an agent with that many
                # certificates due at once; then the next node.
                nd = nodes[(i // in_flight) % len(nodes)]
                ns, sa, csr = csrs[nd][i % len(csrs[nd])]
                req = identity_pb2.SignRequest(namespace=ns, service_account=sa, csr_pem=csr)
                try:
                    if batched:
                        await batchers[nd].sign(req)
                    else:
                        await channels[nd].unary(
                            IDENTITY + "SignWorkloadCertificate",
                            req,
                            identity_pb2.SignResponse,
                            deadline=30,
                        )
                except RpcError as e:  # SignRefused too
                    errors += 1
                    first_error = first_error or f"{e.code().name}: {e.details()}"

        t0 = time.monotonic()
        await asyncio.gather(*(one_worker() for _ in range(in_flight)))
        emit(
            event="signed", n=n, errors=errors, first_error=first_error, t0=t0, t1=time.monotonic()
        )

    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "prepare":
            make_csrs()
            emit(event="prepared")
        elif cmd["cmd"] == "sign":
            await sign(int(cmd["n"]), int(cmd["in_flight"]), bool(cmd.get("batched")))
        elif cmd["cmd"] == "stats":
            emit(event="stats", apply_s=apply_s)
        elif cmd["cmd"] == "exit":
            break
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
    for c in creds.values():
        with contextlib.suppress(Exception):
            await c.close()


# --------------------------------------------------------------------------- controller side


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def send(self, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(kw) + "\n").encode())
        await self.proc.stdin.drain()

    async def events(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                await queue.put(json.loads(line))


async def _run(
    *,
    workloads: int,
    agents: int,
    workers: int,
    changes: int,
    sign_n: int,
    in_flight: int,
    direct_n: int,
    poll: float,
    progress: Progress,
) -> dict[str, Any]:
    from controller.ca.authority import CertificateAuthority, FileCAStore
    from controller.ca.spiffe import make_csr, new_key
    from controller.server import Controller
    from controller.settings import ControllerSettings

    out: dict[str, Any] = {
        "workloads": workloads,
        "agents": agents,
        "workers": workers,
        "poll_interval": poll,
    }
    with tempfile.TemporaryDirectory(prefix="weft-scale-") as tmpd:
        tmp = Path(tmpd)
        cfg = tmp / "config"
        cfg.mkdir()
        shares = spread(workloads, agents)
        for n, share in enumerate(shares):
            (cfg / f"{node_name(n)}.yaml").write_text(config_docs(n, share))
        changed_node = agents // 2
        changed = shares[changed_node][len(shares[changed_node]) // 2]
        settings = ControllerSettings(
            config_dir=cfg,
            state_dir=tmp / "state",
            listen="127.0.0.1:0",
            bootstrap_listen="127.0.0.1:0",
            admin_socket=tmp / "admin.sock",
            metrics_listen="127.0.0.1:0",
            poll_interval=poll,
        )
        t = time.monotonic()
        c = Controller(settings)
        await c.start()
        progress(
            f"controller up with {workloads} workloads on {agents} nodes, revision "
            f"{c.store.revision} ({time.monotonic() - t:.1f}s)"
        )
        procs: list[Worker] = []
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        readers: list[asyncio.Task[None]] = []
        try:
            per_worker = spread(agents, workers)
            t_start = time.monotonic()
            cpu_start = _controller_cpu(c)
            for idx in per_worker:
                p = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "benchmarks.controller_scale",
                    "--worker",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env={**os.environ, "WEFT_LOG_LEVEL": "WARNING"},
                )
                w = Worker(p)
                procs.append(w)
                readers.append(asyncio.create_task(w.events(queue)))
                nodes = [(node_name(n), c.tokens.create(node_name(n), 3600)[0]) for n in idx]
                identities = {
                    node_name(n): sorted({(NS, f"sa-{i % 50}") for i in shares[n]}) for n in idx
                }
                await w.send(
                    main=f"127.0.0.1:{c.ports['main']}",
                    bootstrap=f"127.0.0.1:{c.ports['bootstrap']}",
                    bundle=str(c.trust_bundle_path()),
                    target=[NS, workload_name(changed)],
                    nodes=nodes,
                    identities=identities,
                )
            synced: dict[str, float] = {}
            while len(synced) < agents:
                ev = await asyncio.wait_for(queue.get(), 300)
                if ev.get("event") == "synced":
                    synced[ev["node"]] = ev["t"]
            out["initial_sync_s"] = max(synced.values()) - t_start
            out["initial_sync_first_s"] = min(synced.values()) - t_start
            # CPU spent meanwhile (a machine's speed varies from run to run; CPU less so).
            out["initial_sync_cpu_s"] = {
                "controller": _controller_cpu(c) - cpu_start,
                "agents": sum(_cpu_of(w.proc.pid) for w in procs),
            }
            out["resources_per_snapshot"] = workloads + agents
            progress(
                f"{agents} agents synced in {out['initial_sync_s']:.1f}s (the first after "
                f"{out['initial_sync_first_s']:.1f}s); CPU: controller "
                f"{out['initial_sync_cpu_s']['controller']:.1f}s, agents "
                f"{out['initial_sync_cpu_s']['agents']:.1f}s"
            )
            # Let the initial burst settle (ACKs, the last "applied" events).
            await asyncio.sleep(1.0)
            while not queue.empty():
                queue.get_nowait()
            runs = []
            for rev in range(1, changes + 1):
                before = c.store.revision
                f = cfg / f"{node_name(changed_node)}.yaml"
                t0 = time.monotonic()
                f.write_text(config_docs(changed_node, shares[changed_node], rev, changed))
                applied: dict[str, float] = {}
                t_rev = None
                while len(applied) < agents:
                    if t_rev is None and c.store.revision > before:
                        t_rev = time.monotonic()
                    try:
                        ev = await asyncio.wait_for(queue.get(), 0.005)
                    except TimeoutError:
                        if time.monotonic() - t0 > 120:
                            raise TimeoutError(
                                f"only {len(applied)}/{agents} agents applied the change"
                            ) from None
                        continue
                    if ev.get("event") == "applied" and ev.get("label") == str(rev):
                        applied.setdefault(ev["node"], ev["t"])
                times = sorted(x - t0 for x in applied.values())
                detect = (t_rev - t0) if t_rev is not None else float("nan")
                runs.append(
                    {
                        "detect_ms": detect * 1000,
                        "fanout_ms": (times[-1] - detect) * 1000,
                        "p50_ms": statistics.median(times) * 1000,
                        "total_ms": times[-1] * 1000,
                    }
                )
                progress(
                    f"change {rev}: store after {detect * 1000:.0f} ms, every agent after "
                    f"{times[-1] * 1000:.0f} ms (p50 agent {statistics.median(times) * 1000:.0f})"
                )
                await asyncio.sleep(0.3)
            out["propagation_runs"] = runs
            out["propagation"] = {
                k: statistics.median(r[k] for r in runs)
                for k in ("detect_ms", "fanout_ms", "p50_ms", "total_ms")
            }
            for w in procs:
                await w.send(cmd="stats")
            full: list[float] = []
            delta: list[float] = []
            got = 0
            while got < len(procs):
                ev = await asyncio.wait_for(queue.get(), 30)
                if ev.get("event") == "stats":
                    got += 1
                    full += ev["apply_s"]["full"]
                    delta += ev["apply_s"]["delta"]
            out["agent_apply_ms"] = {
                "full_snapshot_p50": statistics.median(full) * 1000 if full else None,
                "delta_p50": statistics.median(delta) * 1000 if delta else None,
            }
            # Signing through gRPC, every worker at once; the CPU the controller's processes
            # (this one, which runs nothing else meanwhile, and its signers) spend on it.
            # Once with a call per certificate, once batched as agents batch.
            signing: dict[str, Any] = {}
            # Every worker makes its CSRs first, and says so, before any starts signing:
            # no worker's clock runs while another still makes its CSRs on the same CPUs.
            for w in procs:
                await w.send(cmd="prepare")
            prepared = 0
            while prepared < len(procs):
                ev = await asyncio.wait_for(queue.get(), 300)
                prepared += ev.get("event") == "prepared"
            for batched in (False, True):
                cpu0 = _controller_cpu(c)
                per = sign_n // len(procs)
                for w in procs:
                    await w.send(cmd="sign", n=per, in_flight=in_flight, batched=batched)
                done: list[dict[str, Any]] = []
                while len(done) < len(procs):
                    ev = await asyncio.wait_for(queue.get(), 300)
                    if ev.get("event") == "signed":
                        done.append(ev)
                span = max(e["t1"] for e in done) - min(e["t0"] for e in done)
                total = sum(e["n"] - e["errors"] for e in done)
                errors = sum(e["errors"] for e in done)
                cpu = _controller_cpu(c) - cpu0
                pre = "grpc_batched" if batched else "grpc"
                signing |= {
                    f"{pre}_per_s": total / span if span > 0 else None,
                    f"{pre}_controller_cpu_us_per_cert": cpu / total * 1e6 if total else None,
                    f"{pre}_requests": total,
                    f"{pre}_errors": errors,
                }
                if errors:
                    signing[f"{pre}_first_error"] = next(
                        e["first_error"] for e in done if e["errors"]
                    )
                progress(
                    f"gRPC signing{' (batched)' if batched else ''}: "
                    f"{signing[f'{pre}_per_s']:.0f} certificates/s ({errors} errors), "
                    f"controller CPU {signing[f'{pre}_controller_cpu_us_per_cert']:.0f} us each"
                )
            signing |= {
                "controller_cpu_us_per_cert": signing["grpc_controller_cpu_us_per_cert"],
                "signer_processes": c.signer.ready_children,
                "signed_in_controller_process": c.signer.in_process,
                "grpc_clients": len(procs),
                "grpc_in_flight": in_flight,
            }
        finally:
            for w in procs:
                with contextlib.suppress(Exception):
                    await w.send(cmd="exit")
            for w in procs:
                try:
                    await asyncio.wait_for(w.proc.wait(), 10)
                except TimeoutError:
                    w.proc.kill()
                    await w.proc.wait()
            for task in readers:
                task.cancel()
            await c.stop(0.5)
        # Directly through the CA: no gRPC, no node check; CSRs made beforehand.
        ca = CertificateAuthority.load_or_create(
            FileCAStore(tmp / "direct-ca.json"), "cluster.local"
        )
        key = new_key()
        csrs = [make_csr(key, ca.workload_id(NS, f"sa-{i % 50}")) for i in range(50)]
        t = time.perf_counter()
        for i in range(direct_n):
            ca.sign_workload(csrs[i % 50], NS, f"sa-{i % 50}")
        signing["direct_per_s"] = direct_n / (time.perf_counter() - t)
        signing["direct_requests"] = direct_n
        progress(f"direct signing: {signing['direct_per_s']:.0f} certificates/s")
        out["signing"] = signing
    return out


def run(
    *,
    quick: bool = False,
    workloads: int | None = None,
    agents: int | None = None,
    workers: int = 4,
    progress: Progress = print,
) -> dict[str, Any]:
    """The whole benchmark; a JSON-ready dict."""
    import logging

    logging.getLogger("weft").setLevel(logging.WARNING)
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(
        _run(
            workloads=workloads or (2000 if quick else 10_000),
            agents=agents or (20 if quick else 100),
            workers=workers,
            changes=2 if quick else 5,
            sign_n=800 if quick else 4000,
            in_flight=8,
            direct_n=500 if quick else 3000,
            poll=0.1,
            progress=progress,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="2,000 workloads, 20 agents")
    ap.add_argument("--workloads", type=int)
    ap.add_argument("--agents", type=int)
    ap.add_argument("--workers", type=int, default=4, help="agent worker processes")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        try:
            import uvloop

            uvloop.run(worker_main())
        except ImportError:
            asyncio.run(worker_main())
        return
    out = run(quick=args.quick, workloads=args.workloads, agents=args.agents, workers=args.workers)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
