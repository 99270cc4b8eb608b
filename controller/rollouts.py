"""Canary analysis in the controller, Flagger's model (Rollout analysis.provider: prometheus).

Judged in one place instead of in every waypoint replica on the traffic it happens to carry:
the controller measures each step from the waypoints' metrics in Prometheus, judges it with
the same state machine the waypoints use (agent/waypoint/ai/canary.py, `judge`), asks the
Rollout's webhooks, and publishes where the rollout stands as a RolloutState resource. That
resource travels like any config (store -> agents -> waypoints), and every waypoint replica
`follow`s it: they all apply the same weights.

Per step, over the step's interval (PromQL, summed over every waypoint replica):

    requests   sum(increase(istio_requests_total{reporter="waypoint", <canary>}[I]))
    errors     the same with response_code 5xx or 0 (no response: a reset or timeout)
    p99        histogram_quantile(0.99, sum by (le) (rate(
                   istio_request_duration_milliseconds_bucket{...}[I]))) / 1000
    p99 TTFT   histogram_quantile(0.99, sum by (le) (rate(
                   gen_ai_server_time_to_first_token_bucket{<canary>}[I])))

where <canary> selects destination_workload (the canary Service's pods' workload names, as
the waypoints label them) in the canary's namespace; the same for the stable version (shown,
not judged). Custom checks are the Rollout's own queries against their thresholdRange.

Only the state machine's inputs come from outside; a failed query makes the step wait (an
event says why), never pass. A controller without --prometheus-url publishes that such
rollouts wait for one. Restarted, the controller carries on from the published state of
the same Rollout spec (the state's `generation`); an edited spec starts over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.waypoint.ai.canary import CanaryAnalysis, CheckResult, Window
from controller.model.ai import (
    Rollout,
    RolloutMetric,
    RolloutState,
    RolloutWebhook,
    rollout_generation,
)
from controller.model.workloads import Service, Workload, workload_name, workload_version
from controller.store import ConfigStore, Offer

log = logging.getLogger("weft.rollouts")

SOURCE = "controller/rollouts"  # the store source that owns every RolloutState
TICK = 1.0  # seconds between looks at the rollouts
JUDGE_BUDGET = 90.0  # seconds one rollout's judgement (queries, webhooks) may take
NO_PROMETHEUS = "a Prometheus to judge by (controller --prometheus-url)"


class QueryError(Exception):
    pass


class Prometheus:
    """Instant queries against Prometheus' HTTP API (GET /api/v1/query)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, promql: str) -> Any:
        q = urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=self.timeout) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            # Prometheus says why in the body ({"status": "error", "error": ...}).
            try:
                why = json.loads(e.read()).get("error") or str(e)
            except (OSError, ValueError):
                why = str(e)
            raise QueryError(f"Prometheus {self.url}: {why} (query {promql})") from e
        except (OSError, ValueError) as e:
            raise QueryError(f"Prometheus {self.url}: {e}") from e
        if body.get("status") != "success":
            raise QueryError(f"Prometheus {self.url}: {body.get('error') or body}")
        return body["data"]

    async def value(self, promql: str) -> float | None:
        """The query's single number: a scalar, or the sum of an instant vector's samples;
        None when it has no sample (nothing measured), or NaN (a quantile of nothing)."""
        data = await asyncio.to_thread(self._get, promql)
        kind, result = data.get("resultType"), data.get("result")
        if kind == "scalar":
            v = float(result[1])
        elif kind == "vector":
            if not result:
                return None
            v = sum(float(s["value"][1]) for s in result)
        else:
            raise QueryError(f"{promql!r} returned a {kind}, not one number")
        return None if math.isnan(v) else v


def duration(seconds: float) -> str:
    """A PromQL range: whole seconds, at least 1s."""
    return f"{max(1, math.ceil(seconds))}s"


def _promql_string(s: str) -> str:
    """A PromQL double-quoted string literal's content (Go escapes)."""
    return s.replace("\\", "\\\\").replace('"', '\\"')


def _alternatives(values: Iterable[str]) -> str:
    return _promql_string("|".join(re.escape(v) for v in sorted(set(values))) or "^$")


def selector(workloads: list[str], namespace: str, versions: list[str] | None = None) -> str:
    """Label matchers for the workloads (regex-escaped, then escaped for the string), and
    their versions when the workload names alone do not tell canary from stable."""
    out = (
        f'destination_workload=~"{_alternatives(workloads)}",'
        f'destination_workload_namespace="{_promql_string(namespace)}"'
    )
    if versions is not None:
        out += f',destination_version=~"{_alternatives(versions)}"'
    return out


class Indistinct(QueryError):
    """The canary's pods and the stable's look the same in the waypoints' metrics."""


def selectors(
    canary: list[tuple[str, str]], stable: list[tuple[str, str]], namespace: str
) -> tuple[str, str]:
    """(canary, stable) label matchers from each version's pods as (workload, version)
    labels: by workload when those differ (Flagger's own Deployments), else by workload
    and version (Istio's app + version labels). Raises Indistinct when neither tells them
    apart: judging would measure the stable version's traffic as the canary's."""
    cn, sn = {n for n, _ in canary}, {n for n, _ in stable}
    if not cn & sn:
        return selector(sorted(cn), namespace), selector(sorted(sn), namespace)
    cv, sv = {v for _, v in canary}, {v for _, v in stable}
    if cv & sv or "unknown" in cv | sv:
        raise Indistinct(
            "the canary's and the stable's pods carry the same app and version labels, so "
            "their metrics cannot be told apart; give them different app (or version) labels"
        )
    return (
        selector(sorted(cn), namespace, sorted(cv)),
        selector(sorted(sn), namespace, sorted(sv)),
    )


def window_queries(sel: str, rng: str) -> dict[str, str]:
    req = f'istio_requests_total{{reporter="waypoint",{sel}}}'
    err = f'istio_requests_total{{reporter="waypoint",{sel},response_code=~"5..|0"}}'
    dur = f'istio_request_duration_milliseconds_bucket{{reporter="waypoint",{sel}}}'
    ttft = f"gen_ai_server_time_to_first_token_bucket{{{sel}}}"
    return {
        "requests": f"sum(increase({req}[{rng}]))",
        "errors": f"sum(increase({err}[{rng}]))",
        "p99": f"histogram_quantile(0.99, sum by (le) (rate({dur}[{rng}]))) / 1000",
        "ttft": f"histogram_quantile(0.99, sum by (le) (rate({ttft}[{rng}])))",
    }


def render_query(m: RolloutMetric, r: Rollout, rng: str) -> str:
    ns = r.namespace
    values = {
        "namespace": ns,
        "canary": r.spec.canary.name,
        "stable": r.spec.stable.name,
        "target": r.spec.target_ref.name,
        "interval": rng,
    }
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda mo: values.get(mo.group(1), mo.group(0)), m.query)


def judge_metric(m: RolloutMetric, value: float | None) -> CheckResult:
    tr = m.threshold_range
    if value is None:
        return CheckResult(m.name, False, "no data")
    if tr.min is not None and value < tr.min:
        return CheckResult(m.name, False, f"{value:g} < min {tr.min:g}")
    if tr.max is not None and value > tr.max:
        return CheckResult(m.name, False, f"{value:g} > max {tr.max:g}")
    return CheckResult(m.name, True, f"{value:g}")


@dataclass
class Tracked:
    generation: str
    analysis: CanaryAnalysis


Poster = Callable[[RolloutWebhook, dict[str, Any]], int]


def post_webhook(hook: RolloutWebhook, payload: dict[str, Any]) -> int:
    """POST the payload as JSON; the HTTP status, or 0 when nothing answered."""
    req = urllib.request.Request(
        hook.url,
        data=json.dumps(payload).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=hook.timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except Exception:  # unreachable, a bad URL, a broken answer: not a yes
        return 0


class RolloutController:
    def __init__(
        self,
        store: ConfigStore,
        prometheus: Prometheus | None,
        *,
        clock: Callable[[], float] = time.time,
        post: Poster = post_webhook,
        rng: random.Random | None = None,
        state_file: Path | None = None,
        leading: Callable[[], bool] = lambda: True,
        write_status: Callable[[str, str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.store = store
        self.prometheus = prometheus
        self.clock = clock
        self.post = post
        self.rng = rng or random.Random()
        self.tracked: dict[tuple[str, str], Tracked] = {}
        self.state_file = state_file
        self.leading = leading  # only the leader judges (controller/leader.py)
        # In a cluster: states go to each Rollout's status (every replica reads them back
        # through its Kubernetes source); else into this store and the state file.
        self.write_status = write_status
        self._written: dict[tuple[str, str], dict[str, Any]] = {}
        self._saved = b""
        self._recover()

    # ---- state that outlives the process -----------------------------------------

    def _recover(self) -> None:
        """Publish the states a previous process saved, before anything is judged, so a
        restart carries every rollout on where it stood (not back to its first step)."""
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            raw = self.state_file.read_bytes()
            docs = json.loads(raw)
            states = [RolloutState.model_validate(d) for d in docs]
        except (OSError, ValueError) as e:
            log.error(
                "rollout states in %s are unreadable (%s); rollouts start over", self.state_file, e
            )
            return
        self._saved = raw
        self.store.offer(SOURCE, Offer(resources=list(states)))
        log.info("recovered %d rollout state(s) from %s", len(states), self.state_file)

    def _save(self, states: list[RolloutState]) -> None:
        if self.state_file is None:
            return
        raw = json.dumps([s.to_dict() for s in states], sort_keys=True).encode()
        if raw == self._saved:
            return
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_bytes(raw)
        tmp.chmod(0o600)
        tmp.replace(self.state_file)
        self._saved = raw

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # one bad tick must not end the rollouts; it is logged
                log.exception("rollout analysis failed; trying again")
            await asyncio.sleep(TICK)

    async def tick(self) -> None:
        """Look at every Rollout judged here: judge the ones due, publish their states."""
        if not self.leading():
            self.tracked.clear()  # a replica that leads again starts from what is published
            return
        now = self.clock()
        rollouts = [
            r
            for r in self.store.resources("Rollout")
            if isinstance(r, Rollout) and r.spec.analysis.provider == "prometheus"
        ]
        published = {
            (r.namespace, r.name): r
            for r in self.store.resources("RolloutState")
            if isinstance(r, RolloutState)
        }
        live: dict[tuple[str, str], tuple[Rollout, Tracked]] = {}
        for r in rollouts:
            key = (r.namespace, r.name)
            live[key] = (r, self._track(r, published.get(key), now))
        due = [
            (r, t.analysis)
            for r, t in live.values()
            if (d := t.analysis.next_check()) is not None and now >= d
        ]
        # Concurrently, each within a time budget: a slow webhook or query holds up its own
        # rollout, never the others'.
        await asyncio.gather(*(self._judge_within(r, a, now) for r, a in due))
        for key in [k for k in self.tracked if k not in live]:
            del self.tracked[key]
        states = [self._state(r, t) for r, t in live.values()]
        if self.write_status is None:
            self.store.offer(SOURCE, Offer(resources=list(states)))
            self._save(states)
        else:
            await self._write(states, published)

    async def _write(
        self, states: list[RolloutState], published: dict[tuple[str, str], RolloutState]
    ) -> None:
        """Each changed state to its Rollout's status (a merge patch of status.rollout)."""
        assert self.write_status is not None
        for st in states:
            key = (st.namespace, st.name)
            body = st.to_dict()["spec"]
            seen = published.get(key)
            if self._written.get(key) == body or (
                seen is not None and seen.to_dict()["spec"] == body
            ):
                self._written[key] = body
                continue
            try:
                await asyncio.to_thread(self.write_status, st.namespace, st.name, body)
            except Exception as e:  # the next tick tries again
                log.warning("could not write rollout %s/%s's state: %s", *key, e)
                continue
            self._written[key] = body

    async def _judge_within(self, r: Rollout, a: CanaryAnalysis, now: float) -> None:
        try:
            async with asyncio.timeout(JUDGE_BUDGET):
                await self._judge(r, a, now)
        except Exception as e:  # this rollout's failure is its own: it waits, says why
            a.waiting_for = f"its analysis ({type(e).__name__}: {e})"
            a.window_start = now
            log.warning(
                "rollout %s/%s: analysis failed: %r; the step waits", r.namespace, r.name, e
            )

    def _track(self, r: Rollout, st: RolloutState | None, now: float) -> Tracked:
        key = (r.namespace, r.name)
        gen = rollout_generation(r)
        t = self.tracked.get(key)
        if t is not None and t.generation == gen:
            return t
        a = CanaryAnalysis(r, now, random.Random(self.rng.random()))
        if st is not None and st.spec.generation == gen:
            a.restore(st.spec)
            log.info("rollout %s/%s: carrying on at step %d", *key, a.step)
        if self.prometheus is None:
            a.waiting_for = NO_PROMETHEUS
            log.warning("rollout %s/%s needs %s; it waits at step %d", *key, NO_PROMETHEUS, a.step)
        t = self.tracked[key] = Tracked(gen, a)
        return t

    def _state(self, r: Rollout, t: Tracked) -> RolloutState:
        return RolloutState.model_validate(
            {
                "apiVersion": "weft.dev/v1alpha1",
                "kind": "RolloutState",
                "metadata": {"name": r.name, "namespace": r.namespace},
                "spec": t.analysis.state(t.generation),
            }
        )

    # ---- one judgement ---------------------------------------------------------------

    async def _judge(self, r: Rollout, a: CanaryAnalysis, now: float) -> None:
        if self.prometheus is None:
            a.window_start = now  # nothing to judge by: look again after an interval
            return
        rng = duration(a.interval())
        try:
            (c_pods, ns), (s_pods, _) = self._pods(r, "canary"), self._pods(r, "stable")
            c_sel, s_sel = selectors(c_pods, s_pods, ns)
            canary = await self._window(c_sel, r, rng)
            stable = await self._window(s_sel, r, rng)
            checks = [
                judge_metric(m, await self.prometheus.value(render_query(m, r, rng)))
                for m in r.spec.metrics
            ]
        except QueryError as e:
            a.waiting_for = str(e) if isinstance(e, Indistinct) else f"Prometheus ({e})"
            a.window_start = now
            log.warning("rollout %s/%s: %s; the step waits", r.namespace, r.name, e)
            return
        a.waiting_for = None
        payload = {
            "name": r.name,
            "namespace": r.namespace,
            "phase": a.phase,
            "step": a.step,
            "canaryWeight": a.canary_weight,
            "checksum": rollout_generation(r),
        }
        rollback_by = None
        for hook in r.spec.webhooks:
            if hook.type == "rollback":
                code = await asyncio.to_thread(
                    self.post, hook, {**payload, "type": hook.type, "metadata": hook.metadata}
                )
                if 200 <= code < 300:
                    rollback_by = hook.name
                    break
        denied = None
        if a.step == len(r.spec.steps) - 1:
            for hook in r.spec.webhooks:
                if hook.type == "confirm-promotion":
                    code = await asyncio.to_thread(
                        self.post, hook, {**payload, "type": hook.type, "metadata": hook.metadata}
                    )
                    if not 200 <= code < 300:
                        denied = hook.name
                        break
        for event in a.judge(
            now, canary, stable, checks, promotion_denied=denied, rollback_by=rollback_by
        ):
            log.info("rollout %s", event)

    def _pods(self, r: Rollout, version: str) -> tuple[list[tuple[str, str]], str]:
        """(workload, version) labels, as the waypoints label the metrics, of the pods
        behind the version's Service; and its namespace."""
        ref = r.spec.canary if version == "canary" else r.spec.stable
        ns = ref.namespace or r.namespace
        svc = next(
            (
                s
                for s in self.store.resources("Service")
                if isinstance(s, Service) and s.namespace == ns and s.name == ref.name
            ),
            None,
        )
        if svc is None:
            return [], ns
        pods = [
            (workload_name(w), workload_version(w))
            for w in self.store.resources("Workload")
            if isinstance(w, Workload) and svc.selects(w)
        ]
        return pods, ns

    async def _window(self, sel: str, r: Rollout, rng: str) -> Window:
        assert self.prometheus is not None
        q = window_queries(sel, rng)
        requests = await self.prometheus.value(q["requests"]) or 0.0
        errors = await self.prometheus.value(q["errors"]) or 0.0
        p99 = await self.prometheus.value(q["p99"]) if requests else None
        ttft = None
        if r.spec.thresholds.max_p99_time_to_first_token is not None and requests:
            ttft = await self.prometheus.value(q["ttft"])
        # increase() extrapolates to the window's edges: a count, so round it.
        return Window(round(requests), round(errors), p99, ttft)
