"""The waypoint's traffic engine: routing, load balancing, limits, outlier detection, health
checks, retries, fault injection and fallback, as sans-IO decisions.

The asyncio shell (agent/waypoint/proxy.py) asks; the engine answers with plain objects and
never touches a socket, a timer or the wall clock. See docs/waypoint-engine.md.
"""

from agent.waypoint.engine.backend import Attempt, Backend, BackendKey
from agent.waypoint.engine.balancer import Endpoint, hash64, make_balancer
from agent.waypoint.engine.engine import Engine, Forward
from agent.waypoint.engine.events import BackendCounters, EngineEvent, RouteCounters
from agent.waypoint.engine.health import Probe
from agent.waypoint.engine.outcome import Failure
from agent.waypoint.engine.pool import OVERFLOW_RESPONSE, Admission
from agent.waypoint.engine.respond import Respond

__all__ = [
    "OVERFLOW_RESPONSE",
    "Admission",
    "Attempt",
    "Backend",
    "BackendCounters",
    "BackendKey",
    "Endpoint",
    "Engine",
    "EngineEvent",
    "Failure",
    "Forward",
    "Probe",
    "Respond",
    "RouteCounters",
    "hash64",
    "make_balancer",
]
