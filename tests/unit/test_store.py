"""The config store: last good versions survive bad input, sources own what they offer,
and reconnecting agents get deltas from the changelog."""

from __future__ import annotations

import textwrap

from controller.model.base import ResourceKey
from controller.model.loader import parse_text
from controller.sources.files import FileSource
from controller.store import ConfigStore

SVC = """\
apiVersion: v1
kind: Service
metadata: {name: llm, namespace: ai}
spec:
  selector: {app: llm}
  ports: [{port: 8000}]
"""
POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-apps, namespace: ai}
spec:
  action: ALLOW
  rules:
    - from: [{source: {namespaces: [apps]}}]
      to: [{operation: {ports: ["8000"]}}]
"""
KEY = ResourceKey("AuthorizationPolicy", "ai", "allow-apps")


def test_bad_version_of_a_policy_keeps_the_last_good_one(tmp_path):
    store = ConfigStore()
    src = FileSource(tmp_path, store)
    f = tmp_path / "policy.yaml"
    f.write_text(POLICY)
    src.scan()
    good = store.get(KEY)
    assert good is not None
    f.write_text(POLICY.replace("action: ALLOW", "action: PERMIT"))
    src.scan()
    assert store.get(KEY) is good
    (rej,) = store.rejections()
    assert str(rej.problems[0]) == (
        "policy.yaml:5: AuthorizationPolicy ai/allow-apps: "
        "spec.action: Input should be 'ALLOW', 'DENY', 'AUDIT' or "
        "'CUSTOM'"
    )
    f.write_text(POLICY.replace("apps]", "web]"))
    src.scan()
    assert store.get(KEY) is not good and not store.rejections()


def test_yaml_syntax_error_keeps_everything_the_file_had(tmp_path):
    store = ConfigStore()
    src = FileSource(tmp_path, store)
    f = tmp_path / "all.yaml"
    f.write_text(SVC + "---\n" + POLICY)
    src.scan()
    rev = store.revision
    f.write_text(SVC + "---\n" + POLICY + "  rules: [\n")
    src.scan()
    assert store.revision == rev and len(store.entries()) == 2
    assert "YAML syntax" in str(store.rejections()[0].problems[0])


def test_deleting_a_file_deletes_its_resources(tmp_path):
    store = ConfigStore()
    src = FileSource(tmp_path, store)
    (tmp_path / "svc.yaml").write_text(SVC)
    src.scan()
    (tmp_path / "svc.yaml").unlink()
    src.scan()
    assert store.entries() == []


def test_two_sources_cannot_both_define_a_resource():
    store = ConfigStore()
    store.offer("file:a.yaml", parse_text(SVC, "a.yaml"))
    store.offer("file:b.yaml", parse_text(SVC.replace("8000", "9000"), "b.yaml"))
    assert store.get(ResourceKey("Service", "ai", "llm")).source == "file:a.yaml"
    (rej,) = store.rejections()
    assert "already provided by file:a.yaml" in str(rej.problems[0])


def test_unchanged_offer_does_not_bump_the_revision():
    store = ConfigStore()
    store.offer("s", parse_text(SVC, "s.yaml"))
    rev = store.revision
    store.offer("s", parse_text(SVC, "s.yaml"))
    assert store.revision == rev


def test_delta_since_a_revision_has_upserts_and_removals():
    store = ConfigStore()
    store.offer("a", parse_text(SVC, "a.yaml"))
    base = store.revision
    store.offer("b", parse_text(POLICY, "b.yaml"))
    store.offer("a", parse_text("", "a.yaml"))
    d = store.delta_since(base)
    assert [e.key for e in d.upserts] == [KEY]
    assert d.removed == (ResourceKey("Service", "ai", "llm"),)
    assert store.delta_since(store.revision).upserts == ()
    assert store.delta_since(store.revision + 5) is None  # from the future: snapshot


def test_changelog_window_forces_a_snapshot(monkeypatch):
    import controller.store as st

    store = ConfigStore()
    store._log = st.deque(maxlen=3)
    for i in range(6):
        store.offer(f"s{i}", parse_text(SVC.replace("name: llm", f"name: s{i}"), "x.yaml"))
    assert store.delta_since(1) is None
    assert store.delta_since(store.revision - 2) is not None


def test_kubernetes_list_documents_are_read(tmp_path):
    text = textwrap.dedent("""\
        apiVersion: v1
        kind: List
        items:
          - {apiVersion: v1, kind: Service, metadata: {name: a, namespace: x},
             spec: {selector: {app: a}, ports: [{port: 80}]}}
          - {apiVersion: v1, kind: Service, metadata: {name: b, namespace: x},
             spec: {selector: {app: b}, ports: [{port: 80}]}}
        """)
    assert [r.name for r in parse_text(text, "l.yaml").resources] == ["a", "b"]


def test_epochs_of_later_controller_starts_sort_after_earlier_ones():
    """Revisions restart with the controller process; its epoch orders the histories."""
    from controller.store import new_epoch

    first, later = new_epoch(now=1_765_000_000.0), new_epoch(now=1_765_000_000.001)
    assert first < later and len(first) == len(later) == 16
    assert new_epoch(now=1_765_000_000.0) != first  # same millisecond: still distinct
