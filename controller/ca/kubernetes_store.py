"""The CA state in a Kubernetes Secret, and the trust bundle in a ConfigMap.

- The Secret (default weft-system/weft-ca, key `ca.json`) holds the same JSON document the
  file store keeps in ca.json: roots and the active key. It is created when missing and
  replaced with optimistic concurrency: every write carries the resourceVersion this
  controller last read, so two controllers cannot silently overwrite each other's root (the
  second write fails with 409 and says so).
- The ConfigMap (default weft-system/weft-ca-root, key `trust-bundle.pem`) carries the
  roots' certificates only. Agents mount it as the bundle they trust the controller with at
  first contact (`weft agent run --ca-bundle`). It is written on every save (a new CA, a
  rotation) and when the CA is loaded, so a deleted ConfigMap comes back on restart.

RBAC: the Helm chart creates both objects empty (kept on uninstall), so the controller only
needs get/update on exactly these two names (resourceNames); Kubernetes cannot restrict
`create` by name, which is why the chart does the creating. Without the chart, the store
creates them itself (then the controller needs create on Secrets and ConfigMaps).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Any

from controller.errors import WeftError
from controller.sources.kubernetes import KubeAPI, KubeAPIError

log = logging.getLogger("weft.ca.kubernetes")

STATE_KEY = "ca.json"
BUNDLE_KEY = "trust-bundle.pem"
LABELS = {"app.kubernetes.io/part-of": "weft", "app.kubernetes.io/component": "ca"}


def split_ref(ref: str, what: str) -> tuple[str, str]:
    ns, sep, name = ref.partition("/")
    if not sep or not ns or not name:
        raise WeftError(f"{what} {ref!r} must be NAMESPACE/NAME")
    return ns, name


def bundle_from_state(data: bytes, now: float | None = None) -> bytes:
    """The PEM certificates of every root still in the bundle (not retired yet)."""
    doc = json.loads(data)
    t = time.time() if now is None else now
    return b"".join(
        r["cert"].encode()
        for r in doc.get("roots", [])
        if r.get("cert") and (r.get("retireAfter") is None or r["retireAfter"] > t)
    )


class SecretCAStore:
    def __init__(
        self,
        api: KubeAPI,
        secret: str = "weft-system/weft-ca",
        bundle_configmap: str | None = "weft-system/weft-ca-root",
    ) -> None:
        self.api = api
        self.namespace, self.name = split_ref(secret, "CA secret")
        self.bundle = (
            split_ref(bundle_configmap, "trust bundle ConfigMap") if bundle_configmap else None
        )
        self._version: str | None = None  # resourceVersion of the Secret we last read/wrote

    def describe(self) -> str:
        return f"Secret {self.namespace}/{self.name}"

    def _secret_path(self, name: str | None = None) -> str:
        base = f"/api/v1/namespaces/{self.namespace}/secrets"
        return f"{base}/{name}" if name else base

    def load(self) -> bytes | None:
        try:
            secret = self.api.request("GET", self._secret_path(self.name))
        except KubeAPIError as e:
            if e.status == 404:
                self._version = None
                return None
            raise WeftError(
                f"cannot read the CA from {self.describe()}: {e}",
                hint="the controller's Role must allow get on that Secret"
                if e.status == 403
                else None,
            ) from None
        self._version = (secret.get("metadata") or {}).get("resourceVersion")
        raw = (secret.get("data") or {}).get(STATE_KEY)
        if not raw:
            # The Helm chart creates the Secret empty (so the controller needs no create
            # permission on Secrets): no CA yet. save() fills it in with an update.
            if secret.get("data"):
                raise WeftError(
                    f"{self.describe()} holds data but no {STATE_KEY} key",
                    hint="it is not weft's CA Secret; remove it or point --ca-secret elsewhere",
                )
            return None
        data = base64.b64decode(raw)
        self.publish_bundle(bundle_from_state(data))
        return data

    def save(self, data: bytes) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": LABELS},
            "type": "Opaque",
            "data": {STATE_KEY: base64.b64encode(data).decode()},
        }
        try:
            if self._version is None:
                out = self.api.request("POST", self._secret_path(), body=body)
            else:
                body["metadata"]["resourceVersion"] = self._version
                out = self.api.request("PUT", self._secret_path(self.name), body=body)
        except KubeAPIError as e:
            if e.status == 409:
                raise WeftError(
                    f"{self.describe()} was changed by someone else since this controller "
                    "read it (another replica created or rotated the CA)",
                    hint="restart this controller to load the current CA; run one replica "
                    "while rotating roots",
                ) from None
            raise WeftError(f"cannot write the CA to {self.describe()}: {e}") from None
        self._version = (out.get("metadata") or {}).get("resourceVersion")
        self.publish_bundle(bundle_from_state(data))

    def publish_bundle(self, pem: bytes) -> None:
        """Create or update the trust bundle ConfigMap; unchanged content is not rewritten."""
        if self.bundle is None:
            return
        ns, name = self.bundle
        path = f"/api/v1/namespaces/{ns}/configmaps"
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "labels": LABELS},
            "data": {BUNDLE_KEY: pem.decode()},
        }
        try:
            try:
                cur = self.api.request("GET", f"{path}/{name}")
            except KubeAPIError as e:
                if e.status != 404:
                    raise
                self.api.request("POST", path, body=body)
                log.info("published the trust bundle in ConfigMap %s/%s", ns, name)
                return
            if (cur.get("data") or {}).get(BUNDLE_KEY) == body["data"][BUNDLE_KEY]:
                return
            body["metadata"]["resourceVersion"] = (cur.get("metadata") or {}).get("resourceVersion")
            self.api.request("PUT", f"{path}/{name}", body=body)
            log.info("updated the trust bundle in ConfigMap %s/%s", ns, name)
        except KubeAPIError as e:
            # Not fatal: agents also receive the bundle on the config stream. New nodes
            # cannot bootstrap until it is published, so say so loudly.
            log.error(
                "cannot publish the trust bundle to ConfigMap %s/%s: %s; new agents cannot "
                "verify the controller until it is there",
                ns,
                name,
                e,
            )
