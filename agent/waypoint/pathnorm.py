"""Request path normalization: what the waypoint matches is what it forwards.

L7 policy that compares the raw request target is bypassed by any spelling the backend
resolves differently: `//admin`, `/./admin`, `/v1/../admin`, `/%61dmin`. So before
authorization and routing the waypoint rewrites the target into one canonical form,
matches that, and forwards that same string, so the backend never resolves something
policy did not see (Envoy's normalize_path + merge_slashes, Istio's default):

1. the fragment (`#...`) is dropped: it is never sent to servers;
2. percent-encoded *unreserved* characters (ALPHA, DIGIT, `-`, `.`, `_`, `~`) are decoded
   (RFC 3986 section 6.2.2.2), other escapes are kept with uppercase hex;
3. `%2F` and `%5C` (an encoded `/` or `\\`) are refused with 400 by default, since
   backends disagree on whether they separate segments; `decode` turns them into `/`
   (then normalized as any slash), `keep` forwards them as they are (policy then sees
   `%2F` as part of a segment, as the backend may not);
4. a raw backslash, an invalid escape, or a control character is refused with 400;
5. runs of slashes are merged;
6. dot segments are removed (RFC 3986 section 5.2.4), never climbing above the root.

The query is kept as sent (its fragment aside). docs/policy-reference.md has the table
of what happens to each form.
"""

from __future__ import annotations

import re
from typing import Literal

EscapedSlashes = Literal["reject", "decode", "keep"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPE_RE = re.compile(r"%(..)?", re.DOTALL)
_SLASHES_RE = re.compile(r"/{2,}")
_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")  # controls, space and DEL


# A target that is canonical already: the path is "/" or "/"-separated non-empty segments
# (an optional trailing "/") of characters normalize() never changes or refuses (no "%",
# ".", backslash, control, space or DEL), then an optional query. normalize() returns such a
# target as it is (its checks pass and none of its rewrites applies), so one match in C
# stands for them; most requests' targets are like this.
_SEG = r"[^/%.\\#?\x00-\x20\x7f]"
_CANONICAL_RE = re.compile(rf"/(?:{_SEG}+(?:/{_SEG}+)*/?)?(?:\?[^#]*)?")


class BadPath(ValueError):
    """The target cannot be normalized safely; answer 400 with this message."""


def normalize(target: str, escaped_slashes: EscapedSlashes = "reject") -> str:
    """The canonical form of a request target (path and query); raises BadPath."""
    if _CANONICAL_RE.fullmatch(target):
        return target
    return _normalize(target, escaped_slashes)


def _normalize(target: str, escaped_slashes: EscapedSlashes) -> str:
    target = target.split("#", 1)[0]
    path, sep, query = target.partition("?")
    if path == "*":
        return target  # OPTIONS * (server-wide): no path to normalize
    if not path.startswith("/"):
        raise BadPath(f"request path {path[:64]!r} does not start with /")
    if "\\" in path:
        raise BadPath("request path contains a backslash")
    if _CONTROL_RE.search(path):
        raise BadPath("request path contains a control character or space")
    if "%" in path:
        path = _unescape(path, escaped_slashes)
    if "//" in path:
        path = _SLASHES_RE.sub("/", path)
    if "." in path:
        path = remove_dot_segments(path)
    return path + sep + query if sep else path


def _unescape(path: str, escaped_slashes: EscapedSlashes) -> str:
    def one(m: re.Match[str]) -> str:
        hx = m.group(1)
        if hx is None or not (ord(hx[0]) in _HEX and ord(hx[1]) in _HEX):
            raise BadPath(f"invalid percent-escape {m.group(0)!r} in the request path")
        byte = int(hx, 16)
        if byte in (0x2F, 0x5C):  # / and \
            if escaped_slashes == "reject":
                raise BadPath(
                    f"request path contains an encoded {'slash' if byte == 0x2F else 'backslash'}"
                    f" (%{hx.upper()}); refused because backends disagree on what it means"
                )
            if escaped_slashes == "decode":
                return "/"
            return "%" + hx.upper()
        if byte in _UNRESERVED:
            return chr(byte)
        if byte < 0x20 or byte == 0x7F:
            raise BadPath(f"request path contains an encoded control character (%{hx.upper()})")
        return "%" + hx.upper()

    return _ESCAPE_RE.sub(one, path)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path; `..` never climbs above the root."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)
