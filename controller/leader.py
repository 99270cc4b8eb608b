"""Leader election between controller replicas on a Kubernetes Lease (coordination.k8s.io/v1),
client-go's algorithm and defaults.

Every replica serves: it watches the sources (its own store), signs certificates and serves
config streams, so agents may use any replica. Only the leader does the work that must
happen once for the cluster: writing conditions back to the objects (controller/
statuswriter.py) and judging canary rollouts (controller/rollouts.py).

One round (`attempt`), every `retry` seconds:

- no Lease: create it, holding it (a 409: another replica created it first);
- held by this replica: renew (renewTime now), with the read resourceVersion, so an update
  that lost a race is refused (409) instead of overwriting;
- held by another whose renewTime is older than its leaseDurationSeconds: take it over
  (leaseTransitions + 1), same optimistic update;
- otherwise: follow.

A leader that has not renewed for `renew_deadline` seconds (the API server unreachable, the
process starved) steps down before its lease can expire under it, so two replicas never
both act as leader.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from controller.sources.kubernetes import KubeAPI, KubeAPIError

log = logging.getLogger("weft.leader")

LEASE_SECONDS = 15  # client-go's LeaseDuration
RENEW_DEADLINE = 10.0  # client-go's RenewDeadline
RETRY = 2.0  # client-go's RetryPeriod


def micro_time(t: float) -> str:
    """Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str | None) -> float | None:
    if not s:
        return None
    s = s.replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(s).timestamp()
    except ValueError:
        return None


class LeaseElector:
    def __init__(
        self,
        api: KubeAPI,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_seconds: int = LEASE_SECONDS,
        renew_deadline: float = RENEW_DEADLINE,
        retry: float = RETRY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self.collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds = lease_seconds
        self.renew_deadline = renew_deadline
        self.retry = retry
        self.clock = clock
        self.leader = False
        self.holder: str | None = None
        self._renewed = 0.0  # when this replica last held the lease for sure
        self._observed: tuple[Any, ...] = ()  # the lease record as last seen
        self._observed_at = 0.0  # this replica's clock when it last changed

    def _spec(self, now: float, acquired: str | None, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "acquireTime": acquired or micro_time(now),
            "renewTime": micro_time(now),
            "leaseTransitions": transitions,
        }

    def attempt(self) -> bool:
        """One round; whether this replica holds the lease after it."""
        now = self.clock()
        try:
            lease = self.api.request("GET", self.path)
        except KubeAPIError as e:
            if e.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(now, None, 0),
            }
            try:
                self.api.request("POST", self.collection, body=body)
            except KubeAPIError as e2:
                if e2.status == 409:  # another replica created it a moment ago
                    return False
                raise
            self.holder = self.identity
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or None
        self.holder = holder
        duration = int(spec.get("leaseDurationSeconds") or self.lease_seconds)
        transitions = int(spec.get("leaseTransitions") or 0)
        # Expiry is judged by this replica's own clock, from when it last saw the record
        # change (client-go's observedTime), never by comparing the holder's renewTime
        # with this clock: clocks that disagree must not make two leaders.
        rv = (lease.get("metadata") or {}).get("resourceVersion")
        record = (holder, spec.get("renewTime"), rv)
        if record != self._observed:
            self._observed, self._observed_at = record, now
        if holder == self.identity:
            new = self._spec(now, spec.get("acquireTime"), transitions)
        elif holder is None or self._observed_at + duration < now:
            new = self._spec(now, None, transitions + 1)
        else:
            return False
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": (lease.get("metadata") or {}).get("resourceVersion"),
            },
            "spec": new,
        }
        try:
            self.api.request("PUT", self.path, body=body)
        except KubeAPIError as e:
            if e.status == 409:  # someone else updated it first: not ours this round
                return False
            raise
        if holder != self.identity:
            log.info("took the lease %s/%s over from %s", self.namespace, self.name, holder)
        self.holder = self.identity
        return True

    def step(self) -> bool:
        """One round with the renew deadline applied; returns whether this replica leads.
        A renewal counts from when it was sent, and leading needs one within the renew
        deadline as of after the call: a call that hung for a minute does not keep a
        replica leading while another took over."""
        start = self.clock()
        try:
            held = self.attempt()
        except (KubeAPIError, OSError) as e:
            log.warning("lease %s/%s: %s", self.namespace, self.name, e)
            held = self.leader  # a blip: keep leading until the deadline (below)
        else:
            if held:
                self._renewed = start
        late = self.clock() - self._renewed
        if held and late >= self.renew_deadline:
            log.warning(
                "lease %s/%s not renewed for %.0fs: stepping down", self.namespace, self.name, late
            )
            held = False
        self.leader = held
        return held

    async def run(self, on_change: Callable[[bool], None]) -> None:
        while True:
            was = self.leader
            now = await asyncio.to_thread(self.step)
            if now != was:
                log.info(
                    "%s the controller leader (lease %s/%s)",
                    "now" if now else "no longer",
                    self.namespace,
                    self.name,
                )
                on_change(now)
            await asyncio.sleep(self.retry)
