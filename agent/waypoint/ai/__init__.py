"""AI traffic policy in the waypoint: sans-IO pieces the asyncio shell calls per request.

    openai.py    read OpenAI-compatible request bodies; rewrite the model, ask for usage
    usage.py     read a response as it passes (JSON or SSE): usage, model, TTFT, TPOT
    facts.py     what policies match on (caller, model, path, headers)
    quota.py     token/request rate limits and budgets, shared by workers via SQLite
    priority.py  saturation from vLLM metrics and in-flight counts; queue or shed by class
    balance.py   least-loaded endpoint choice with bounded-load session affinity
    router.py    model routing, cost rules and the fallback chain
    cache.py     exact-match response cache, per tenant, LRU by bytes, TTL
    canary.py    automated canary analysis (a state machine on an injected clock)
    metrics.py   OpenTelemetry GenAI metrics as Prometheus collectors (the only module
                 that imports prometheus_client)
    policy.py    the per-Service bundle compiled from config; None when nothing applies

Nothing here opens a socket, sleeps or reads a clock of its own: `now` is passed in and
randomness comes from an injected `random.Random`. The one I/O is the quota store's SQLite
file. docs/ai-traffic.md has the per-request call sequence.
"""
