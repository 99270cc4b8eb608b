"""Request path normalization (agent/waypoint/pathnorm.py): every spelling of a path that a
backend resolves to the same resource is matched, and forwarded, as one canonical form;
spellings backends disagree on are refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.waypoint.pathnorm import BadPath, normalize, remove_dot_segments

# The forms docs/policy-reference.md lists, and what each becomes.
FORMS = [
    ("/admin", "/admin"),
    ("//admin", "/admin"),
    ("///admin//x", "/admin/x"),
    ("/./admin", "/admin"),
    ("/v1/../admin", "/admin"),
    ("/v1/%2e%2e/admin", "/admin"),
    ("/v1/%2E%2E/admin", "/admin"),
    ("/v1/.%2e/admin", "/admin"),
    ("/%61dmin", "/admin"),
    ("/%41DMIN", "/ADMIN"),  # case is the backend's business: only escapes are decoded
    ("/admin#x", "/admin"),
    ("/admin?x=1#frag", "/admin?x=1"),
    ("/a/b/..", "/a/"),
    ("/a/.", "/a/"),
    ("/..", "/"),
    ("/../../etc/passwd", "/etc/passwd"),
    ("/a/%7euser", "/a/~user"),
    ("/a%20b", "/a%20b"),  # a reserved or non-ASCII escape is kept, hex uppercased
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/q?a=%2F..%2F&b=//", "/q?a=%2F..%2F&b=//"),  # the query is the application's
    ("/...", "/..."),
    ("*", "*"),
]


@pytest.mark.parametrize(("raw", "canonical"), FORMS)
def test_each_spelling_has_one_canonical_form(raw, canonical):
    """What the table in docs/policy-reference.md says, form by form."""
    assert normalize(raw) == canonical


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("/admin%2f", "encoded slash"),
        ("/admin%2Fx", "encoded slash"),
        ("/a%5cb", "encoded backslash"),
        ("/a\\b", "backslash"),
        ("/a%zz", "invalid percent-escape"),
        ("/a%4", "invalid percent-escape"),
        ("/a%", "invalid percent-escape"),
        ("/a%00b", "control character"),
        ("/a%0d%0aSet-Cookie:x", "control character"),
        ("admin", "does not start with /"),
        ("http://x/admin", "does not start with /"),
    ],
)
def test_spellings_backends_disagree_on_are_refused(raw, why):
    """Encoded slashes and backslashes (by default), raw backslashes, broken escapes and
    encoded control characters are a 400 naming the reason."""
    with pytest.raises(BadPath, match=why):
        normalize(raw)


def test_the_escaped_slash_options():
    """`decode` makes %2F a separator (then normalized like any slash); `keep` forwards it
    untouched, so policy sees it inside one segment, as a backend that keeps it does."""
    assert normalize("/v1/%2F../admin", "decode") == "/admin"
    assert normalize("/a%2fb", "keep") == "/a%2Fb"
    assert normalize("/a%5Cb", "keep") == "/a%5Cb"


_SEGMENT = st.sampled_from(["a", "b", "admin", ".", "..", "", "%2e", "%2E%2e", "%61", "x~y"])


@given(st.lists(_SEGMENT, max_size=12), st.sampled_from(["", "?q=1", "#f", "?q=/..#f"]))
def test_normalization_is_idempotent_and_leaves_nothing_to_resolve(segments, tail):
    """Normalizing twice changes nothing, and the result has no dot segment, no empty
    segment but a trailing one, and no escape of an unreserved character left: a backend
    that resolves the path itself gets what policy matched."""
    once = normalize("/" + "/".join(segments) + tail)
    assert normalize(once) == once
    path = once.split("?", 1)[0]
    assert "#" not in once
    parts = path.split("/")[1:]
    assert not any(p in (".", "..") for p in parts)
    assert all(p for p in parts[:-1])
    assert "%2E" not in path.upper() and "%61" not in path


def test_remove_dot_segments_follows_rfc_3986():
    """The RFC's own examples (section 5.2.4), for absolute paths."""
    assert remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert remove_dot_segments("/mid/content=5/../6") == "/mid/6"


def test_a_target_taken_as_canonical_by_the_fast_check_is_what_normalize_makes_of_it():
    """normalize() returns a target matching _CANONICAL_RE without the checks and rewrites
    (one regex match in C for the usual request): on random targets over an alphabet of
    the characters that matter (%, ., /, backslash, ?, #, space, controls, non-ASCII), every
    target it takes is one the full path returns unchanged, and the full path's answer
    (or refusal) is what normalize() gives for every target, in every escaped-slash mode."""
    import random

    from agent.waypoint.pathnorm import _CANONICAL_RE, BadPath, _normalize, normalize

    rng = random.Random(5)
    alphabet = [
        "/",
        "/",
        "a",
        "b",
        "%",
        "2F",
        "2e",
        ".",
        "..",
        "\\",
        "?",
        "#",
        " ",
        "\x00",
        "\x7f",
        "é",
        "=",
        "~",
    ]
    taken = 0
    for _ in range(20000):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 10)))
        if rng.random() < 0.8:
            t = "/" + t
        for mode in ("reject", "decode", "keep"):
            try:
                want: str | type[BadPath] = _normalize(t, mode)  # type: ignore[arg-type]
            except BadPath:
                want = BadPath
            try:
                got: str | type[BadPath] = normalize(t, mode)  # type: ignore[arg-type]
            except BadPath:
                got = BadPath
            assert got == want, (t, mode)
        if _CANONICAL_RE.fullmatch(t):
            taken += 1
            assert _normalize(t, "reject") == t
    assert taken > 1000  # the fast check was exercised
