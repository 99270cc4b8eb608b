"""An OTLP/HTTP trace sink (test workload): accepts POST /v1/traces (JSON) and appends
each span, flattened to one JSON line, to a file. Stands in for an OpenTelemetry collector
in the lab's tests and demo."""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def flatten(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for rs in doc.get("resourceSpans", []):
        res = {
            a["key"]: next(iter(a["value"].values()))
            for a in rs.get("resource", {}).get("attributes", [])
        }
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                attrs = {a["key"]: next(iter(a["value"].values())) for a in s.get("attributes", [])}
                out.append(
                    {
                        "service": res.get("service.name"),
                        "name": s["name"],
                        "traceId": s["traceId"],
                        "spanId": s["spanId"],
                        "parentSpanId": s.get("parentSpanId"),
                        "kind": s.get("kind"),
                        "status": s.get("status"),
                        "attributes": attrs,
                    }
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=4318)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(n)
            try:
                spans = flatten(json.loads(body))
            except (ValueError, KeyError):
                self.send_response(400)
                self.end_headers()
                return
            with args.out.open("a") as f:
                f.writelines(json.dumps(s) + "\n" for s in spans)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a: Any) -> None:
            pass

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
