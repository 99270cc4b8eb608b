"""Header fields as an ordered multi-map of lowercase-name bytes to value bytes.

Both parsers hand us bytes (llhttp spans, HPACK output), so bytes in and bytes out costs no
decoding on the hot path. Names are stored lowercase (HTTP/2 requires it on the wire and
HTTP/1.1 names are case-insensitive); values are stored as received, minus surrounding
whitespace. Header lists are short (10-30 fields), so a list with linear lookups beats
building a dict per message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

# Connection-specific fields (RFC 9110 section 7.6.1, RFC 9113 section 8.2.2): they describe
# one hop and must not be forwarded. `te` is the exception when its value is "trailers"
# (gRPC needs it end to end over HTTP/2); names listed in `connection` are stripped too.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    }
)

Field = tuple[bytes, bytes]


class Headers:
    """An ordered multi-map of header fields. Names are lowercase bytes, values bytes."""

    __slots__ = ("fields",)

    fields: list[Field]

    def __init__(self, fields: Iterable[Field] = ()) -> None:
        # A list is adopted as is, so the parsers can hand over what they built without
        # a copy; callers outside the codec should pass lowercase names (or use add/set).
        self.fields = fields if type(fields) is list else list(fields)

    @classmethod
    def of(cls, *pairs: tuple[bytes | str, bytes | str]) -> Headers:
        """Build from (name, value) pairs of str or bytes, lowercasing names: for tests and
        configuration, not for the hot path."""
        return cls([(_b(n).lower(), _b(v)) for n, v in pairs])

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of `name`, or `default`."""
        name = name.lower()
        for n, v in self.fields:
            if n == name:
                return v
        return default

    def get_all(self, name: bytes) -> list[bytes]:
        """Every value of `name`, in order."""
        name = name.lower()
        return [v for n, v in self.fields if n == name]

    def add(self, name: bytes, value: bytes) -> None:
        """Append a field (keeping any existing ones of that name)."""
        self.fields.append((name.lower(), value))

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every field of `name` with one field, placed where the first one was."""
        name = name.lower()
        fields = self.fields
        for i, f in enumerate(fields):
            if f[0] == name:
                fields[i] = (name, value)
                rest = fields[i + 1 :]
                for g in rest:
                    if g[0] == name:  # more of them: drop the rest
                        fields[i + 1 :] = [h for h in rest if h[0] != name]
                        break
                return
        fields.append((name, value))

    def update(self, pairs: Iterable[Field]) -> None:
        """`set` for each pair, in one pass over the fields (the last value of a name
        given twice wins, placed where its first field was; new names go last, in order)."""
        new = {n.lower(): v for n, v in pairs}
        if not new:
            return
        out: list[Field] = []
        placed: set[bytes] = set()
        for f in self.fields:
            n = f[0]
            if n in new:
                if n not in placed:
                    placed.add(n)
                    out.append((n, new[n]))
            else:
                out.append(f)
        if len(placed) < len(new):
            out += [(n, v) for n, v in new.items() if n not in placed]
        self.fields = out

    def remove(self, name: bytes) -> int:
        """Remove every field of `name`; return how many there were."""
        name = name.lower()
        fields = self.fields
        kept = [f for f in fields if f[0] != name]
        n = len(fields) - len(kept)
        if n:
            self.fields = kept
        return n

    def strip_hop_by_hop(self) -> None:
        """Remove connection-specific fields in place (see HOP_BY_HOP), keeping `te: trailers`.

        Call this on headers received from one side before forwarding them to the other.
        """
        fields = self.fields
        drop: set[bytes] | None = None
        for n, v in fields:
            if n in HOP_BY_HOP:
                if drop is None:
                    drop = set()
                if n == b"connection":
                    for token in v.split(b","):
                        drop.add(token.strip().lower())
        if drop is None:
            return
        self.fields = [
            f
            for f in fields
            if (f[0] not in HOP_BY_HOP and f[0] not in drop)
            or (f[0] == b"te" and f[1].strip().lower() == b"trailers")
        ]

    def copy(self) -> Headers:
        return Headers(list(self.fields))

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, bytes):
            return False
        name = name.lower()
        return any(n == name for n, _ in self.fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self.fields == other.fields

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Headers({self.fields!r})"


def _b(s: bytes | str) -> bytes:
    return s.encode("latin-1") if isinstance(s, str) else s


def connection_tokens(headers: Headers) -> set[bytes]:
    """The lowercase tokens of every `connection` field (e.g. {b"close"})."""
    tokens: set[bytes] = set()
    for n, v in headers.fields:
        if n == b"connection":
            tokens.update(t.strip().lower() for t in v.split(b","))
    return tokens
