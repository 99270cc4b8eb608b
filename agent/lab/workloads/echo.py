"""A TCP echo server (test workload): one thread per connection, echoes until EOF.

`--digest` instead reads to EOF and answers with the byte count and SHA-256, so a test
can check byte-exact transfer of large payloads without the echo doubling the traffic.


`--greet` makes it send a line naming the peer first, so tests can see the source address
the server observed (for example the node tunnel's address instead of the client's).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import socket
import threading


def serve_conn(conn: socket.socket, peer: tuple[str, int], greet: bool, digest: bool) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if greet:
            conn.sendall(f"peer {peer[0]}:{peer[1]}\n".encode())
        if digest:
            h = hashlib.sha256()
            n = 0
            while data := conn.recv(1 << 20):
                h.update(data)
                n += len(data)
            conn.sendall(f"{n} {h.hexdigest()}\n".encode())
            return
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--greet", action="store_true")
    ap.add_argument(
        "--digest",
        action="store_true",
        help="instead of echoing, read to EOF and answer '<bytes> <sha256>'",
    )
    args = ap.parse_args()
    srv = socket.create_server((args.host, args.port), backlog=1024, reuse_port=True)
    while True:
        conn, peer = srv.accept()
        threading.Thread(
            target=serve_conn, args=(conn, peer, args.greet, args.digest), daemon=True
        ).start()


if __name__ == "__main__":
    main()
