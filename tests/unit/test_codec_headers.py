"""Header fields of the waypoint codecs: an ordered multi-map of lowercase bytes."""

from __future__ import annotations

from agent.waypoint.codec import Headers


def test_lookups_are_case_insensitive_and_ordered():
    """get returns the first value, get_all every value in order."""
    h = Headers.of(("Accept", "a"), ("x-a", "1"), ("ACCEPT", "b"))
    assert h.get(b"accept") == b"a" and h.get(b"Accept") == b"a"
    assert h.get_all(b"accept") == [b"a", b"b"]
    assert h.get(b"missing") is None and b"x-a" in h and len(h) == 3


def test_set_replaces_in_place_and_remove_counts():
    """set keeps the position of the first field it replaces; remove says how many went."""
    h = Headers.of(("a", "1"), ("b", "2"), ("a", "3"))
    h.set(b"a", b"9")
    assert h == Headers.of(("a", "9"), ("b", "2"))
    h.add(b"C", b"4")
    assert h.remove(b"b") == 1 and h == Headers.of(("a", "9"), ("c", "4"))


def test_remove_of_an_absent_name_changes_nothing():
    """remove(name) of a name not there returns 0 and leaves the very same list in place."""
    h = Headers.of(("a", "1"), ("b", "2"))
    fields = h.fields
    assert h.remove(b"c") == 0 and h.fields is fields and len(h) == 2
    assert h.remove(b"A") == 1 and h == Headers.of(("b", "2"))


def test_copy_is_independent_and_equal():
    """copy() is a Headers of its own list: editing one leaves the other as it was."""
    h = Headers.of(("a", "1"), ("b", "2"))
    c = h.copy()
    assert type(c) is Headers and c == h and c.fields is not h.fields
    c.set(b"a", b"9")
    c.add(b"x", b"y")
    assert h == Headers.of(("a", "1"), ("b", "2"))
    assert c == Headers.of(("a", "9"), ("b", "2"), ("x", "y"))


def test_hop_by_hop_fields_are_stripped_for_forwarding():
    """Connection-specific fields and those named in Connection go; te: trailers stays."""
    h = Headers.of(
        ("connection", "keep-alive, x-hop"), ("keep-alive", "5"), ("x-hop", "1"),
        ("proxy-connection", "x"), ("transfer-encoding", "chunked"), ("upgrade", "h2c"),
        ("te", "trailers"), ("x-model", "llama"),
    )  # fmt: skip
    h.strip_hop_by_hop()
    assert h == Headers.of(("te", "trailers"), ("x-model", "llama"))


def test_te_other_than_trailers_is_stripped():
    """te: gzip is hop-by-hop; only te: trailers crosses the proxy (gRPC needs it)."""
    h = Headers.of(("te", "gzip"), ("x", "1"))
    h.strip_hop_by_hop()
    assert h == Headers.of(("x", "1"))


def test_update_is_set_for_each_pair_in_one_pass():
    """update(pairs) leaves the fields exactly as set() called for each pair in turn would:
    values replaced where a name first was, its later fields dropped, new names appended
    in order, a name given twice taking its last value at its first place."""
    import random

    names = [b"a", b"b", b"c", b"X-Rate", b"x-rate", b"d"]
    rng = random.Random(7)
    for _ in range(500):
        fields = [(rng.choice(names).lower(), b"%d" % i) for i in range(rng.randrange(8))]
        pairs = [(rng.choice(names), b"v%d" % i) for i in range(rng.randrange(5))]
        one, each = Headers(list(fields)), Headers(list(fields))
        one.update(pairs)
        for n, v in pairs:
            each.set(n, v)
        assert one.fields == each.fields, (fields, pairs)


def test_lookups_agree_with_reference_definitions():
    """get, set, remove and strip_hop_by_hop, on random field lists (repeated names,
    hop-by-hop fields, Connection tokens), give what their plainest definitions give."""
    import random

    from agent.waypoint.codec.headers import HOP_BY_HOP

    def ref_get(fields, name):
        return next((v for n, v in fields if n == name), None)

    def ref_set(fields, name, value):
        for i, (n, _) in enumerate(fields):
            if n == name:
                return fields[:i] + [(name, value)] + [f for f in fields[i + 1 :] if f[0] != name]
        return [*fields, (name, value)]

    def ref_strip(fields):
        drop = {t.strip().lower() for n, v in fields if n == b"connection" for t in v.split(b",")}
        return [
            f
            for f in fields
            if (f[0] not in HOP_BY_HOP and f[0] not in drop)
            or (f[0] == b"te" and f[1].strip().lower() == b"trailers")
        ]

    rng = random.Random(7)
    names = [b"a", b"b", b"host", b"x-id", b"te", b"connection", b"upgrade", b"keep-alive"]
    values = [b"1", b"trailers", b"close, x-id", b"a", b""]
    for _ in range(3000):
        fields = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randrange(9))]
        name = rng.choice(names)
        h = Headers(list(fields))
        assert h.get(name.upper()) == ref_get(fields, name)
        h.set(name, b"new")
        assert h.fields == ref_set(fields, name, b"new")
        h = Headers(list(fields))
        assert h.remove(name) == sum(n == name for n, _ in fields)
        assert h.fields == [f for f in fields if f[0] != name]
        h = Headers(list(fields))
        h.strip_hop_by_hop()
        assert h.fields == ref_strip(fields)
