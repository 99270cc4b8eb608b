"""The CA in a Kubernetes Secret and the trust bundle in a ConfigMap, against a fake API
server that keeps objects and enforces resourceVersion like the real one."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from cryptography import x509

from controller.ca.authority import CertificateAuthority
from controller.ca.kubernetes_store import BUNDLE_KEY, STATE_KEY, SecretCAStore, bundle_from_state
from controller.errors import WeftError
from controller.sources.kubernetes import KubeAPIError


class FakeObjects:
    """GET/POST/PUT on /api/v1/namespaces/NS/{secrets,configmaps}[/NAME]."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.rv = 100
        self.calls: list[tuple[str, str]] = []

    def put_object(self, path: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        self.objects[path] = obj

    def request(
        self, method: str, path: str, *, query: Any = None, body: Any = None
    ) -> dict[str, Any]:
        self.calls.append((method, path))
        if method == "GET":
            if path not in self.objects:
                raise KubeAPIError(404, "not found")
            return copy.deepcopy(self.objects[path])
        if method == "POST":
            full = f"{path}/{body['metadata']['name']}"
            if full in self.objects:
                raise KubeAPIError(409, "already exists")
            self.put_object(full, body)
            return copy.deepcopy(self.objects[full])
        if method == "PUT":
            cur = self.objects.get(path)
            if cur is None:
                raise KubeAPIError(404, "not found")
            if body["metadata"].get("resourceVersion") != cur["metadata"]["resourceVersion"]:
                raise KubeAPIError(409, "the object has been modified")
            self.put_object(path, body)
            return copy.deepcopy(self.objects[path])
        raise AssertionError(method)

    def stream(self, path: str, *, query: Any) -> Any:
        raise AssertionError("no watch here")


SECRET = "/api/v1/namespaces/weft-system/secrets/weft-ca"
BUNDLE = "/api/v1/namespaces/weft-system/configmaps/weft-ca-root"


def bundle_certs(api: FakeObjects) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(api.objects[BUNDLE]["data"][BUNDLE_KEY].encode())


def test_a_new_cluster_gets_a_ca_secret_and_a_published_bundle() -> None:
    api = FakeObjects()
    ca = CertificateAuthority.load_or_create(SecretCAStore(api), "cluster.local")
    secret = api.objects[SECRET]
    assert secret["type"] == "Opaque"
    assert base64.b64decode(secret["data"][STATE_KEY]).startswith(b"{")
    assert [c.serial_number for c in bundle_certs(api)] == [ca.active.cert.serial_number]
    assert api.objects[BUNDLE]["data"][BUNDLE_KEY].encode() == ca.bundle_pem()


def test_a_restart_loads_the_same_root() -> None:
    api = FakeObjects()
    first = CertificateAuthority.load_or_create(SecretCAStore(api), "cluster.local")
    again = CertificateAuthority.load_or_create(SecretCAStore(api), "cluster.local")
    assert again.active.cert == first.active.cert
    assert [m for m, _ in api.calls].count("POST") == 2  # one Secret, one ConfigMap, ever


def test_chart_created_empty_objects_are_filled_with_updates_only() -> None:
    """The chart pre-creates both objects so the controller needs no create permission."""
    api = FakeObjects()
    api.put_object(SECRET, {"metadata": {"name": "weft-ca"}, "type": "Opaque"})
    api.put_object(BUNDLE, {"metadata": {"name": "weft-ca-root"}})
    ca = CertificateAuthority.load_or_create(SecretCAStore(api), "cluster.local")
    assert "POST" not in [m for m, _ in api.calls]
    assert api.objects[BUNDLE]["data"][BUNDLE_KEY].encode() == ca.bundle_pem()


def test_rotation_publishes_old_and_new_roots() -> None:
    api = FakeObjects()
    ca = CertificateAuthority.load_or_create(SecretCAStore(api), "cluster.local")
    old = ca.active.cert.serial_number
    ca.rotate(overlap=3600)
    assert [c.serial_number for c in bundle_certs(api)] == [ca.active.cert.serial_number, old]


def test_retired_roots_leave_the_published_bundle() -> None:
    api = FakeObjects()
    ca = CertificateAuthority.load_or_create(SecretCAStore(api), "cluster.local")
    ca.rotate(overlap=60)
    state = base64.b64decode(api.objects[SECRET]["data"][STATE_KEY])
    import time

    assert bundle_from_state(state, now=time.time() + 120).count(b"BEGIN CERTIFICATE") == 1


def test_a_concurrent_writer_is_detected_not_overwritten() -> None:
    api = FakeObjects()
    CertificateAuthority.load_or_create(SecretCAStore(api), "cluster.local")
    a, b = SecretCAStore(api), SecretCAStore(api)
    state = a.load()
    assert state is not None and b.load() == state
    b.save(state)  # another replica rotates: the Secret's version moves on
    with pytest.raises(WeftError, match="changed by someone else"):
        a.save(state)


def test_two_controllers_creating_at_once_fail_cleanly() -> None:
    api = FakeObjects()
    a, b = SecretCAStore(api), SecretCAStore(api)
    assert a.load() is None and b.load() is None  # both saw no CA
    a.save(b'{"roots": []}')
    with pytest.raises(WeftError, match="restart this controller"):
        b.save(b'{"roots": []}')


def test_a_foreign_secret_is_not_taken_over() -> None:
    api = FakeObjects()
    api.put_object(SECRET, {"metadata": {"name": "weft-ca"}, "data": {"tls.crt": "eA=="}})
    with pytest.raises(WeftError, match="not weft's CA Secret"):
        SecretCAStore(api).load()


def test_forbidden_says_which_permission_is_missing() -> None:
    class Forbidden(FakeObjects):
        def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
            raise KubeAPIError(403, "forbidden")

    with pytest.raises(WeftError) as e:
        SecretCAStore(Forbidden()).load()
    assert e.value.hint and "get on that Secret" in e.value.hint


def test_bad_references_are_refused() -> None:
    with pytest.raises(WeftError, match="NAMESPACE/NAME"):
        SecretCAStore(FakeObjects(), "weft-ca")
