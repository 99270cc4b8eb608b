"""CRDs generated from the model registry (controller/crds.py) and shipped in the chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from controller import crds
from controller.model.base import kinds
from controller.model.loader import parse_text

ROOT = Path(__file__).resolve().parents[2]
CHART_CRDS = ROOT / "helm" / "weft" / "crds"
DATA = ROOT / "tests" / "data" / "k8s"
REGENERATE = ".venv/bin/python -m controller.crds --out-dir helm/weft/crds"


def test_chart_crds_are_the_generator_output() -> None:
    """Registering a weft.dev kind, or changing a field, must come with new CRDs."""
    want = {crds.file_name(c): crds.render(c) for c in crds.all_crds()}
    have = {p.name: p.read_text() for p in CHART_CRDS.glob("*.yaml")}
    assert sorted(have) == sorted(want), f"CRD files differ; run: {REGENERATE}"
    for name, text in want.items():
        assert have[name] == text, f"{name} is stale; run: {REGENERATE}"


def test_every_weft_kind_in_the_registry_has_a_crd() -> None:
    served = {c["spec"]["names"]["kind"] for c in crds.all_crds()}
    registered = {
        k
        for k, cls in kinds().items()
        if any(v.startswith("weft.dev/") for v in cls.API_VERSIONS) and not cls.INTERNAL
    }
    assert served == registered and {"Workload", "Node"} <= served
    # What the controller writes itself (RolloutState) is not a user-facing API.
    assert "RolloutState" in kinds() and "RolloutState" not in served


def check_structural(node: dict[str, Any], path: str = "") -> None:
    """The rules of Kubernetes' structural schemas that a generator can get wrong."""
    assert "$ref" not in node and "$defs" not in node, path
    assert "const" not in node and "title" not in node and "default" not in node, path
    assert not ("properties" in node and "additionalProperties" in node), path
    if "exclusiveMinimum" in node:
        assert node["exclusiveMinimum"] is True and "minimum" in node, path
    special = node.get("x-kubernetes-int-or-string") or node.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    assert "type" in node or special, f"{path}: no type"
    for alt in node.get("anyOf", []):
        assert not {"type", "description", "default", "properties"} & set(alt), path
    for k, v in (node.get("properties") or {}).items():
        check_structural(v, f"{path}.{k}")
    if isinstance(node.get("additionalProperties"), dict):
        check_structural(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        check_structural(node["items"], f"{path}[]")


def test_generated_schemas_are_structural() -> None:
    for crd in crds.all_crds():
        for v in crd["spec"]["versions"]:
            check_structural(v["schema"]["openAPIV3Schema"], crd["metadata"]["name"])
        assert crd["spec"]["versions"][0]["storage"] is True


@pytest.mark.parametrize("kind", sorted(kinds()))
def test_every_registered_model_translates(kind: str) -> None:
    """Not only weft.dev kinds: the shapes later weft kinds will reuse (int-or-string, maps
    keyed by port, unions of IP types) all have a structural form."""
    cls = kinds()[kind]
    schema = cls.model_json_schema(by_alias=True, mode="validation")
    check_structural(crds.structural(schema, schema.get("$defs", {})), kind)


def test_a_model_without_a_structural_form_is_refused() -> None:
    with pytest.raises(crds.SchemaError):
        crds.structural({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, {})


def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    """OpenAPI v3 (CRD dialect) is close to JSON Schema draft 4 (boolean exclusiveMinimum)."""
    crd = next(c for c in crds.all_crds() if c["spec"]["names"]["kind"] == kind)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DATA / name).read_text()) if d]


def test_instances_valid_for_the_crd_are_valid_for_the_model() -> None:
    for doc in docs("weft-instances.yaml"):
        crd_validator(doc["kind"]).validate(doc)
    offer = parse_text((DATA / "weft-instances.yaml").read_text(), "weft-instances.yaml")
    assert not offer.problems
    assert [r.KIND for r in offer.resources] == ["Workload", "Node"]


def test_instances_invalid_for_the_model_are_refused_by_the_crd_too() -> None:
    path = DATA / "weft-instances-invalid.yaml"
    for doc in docs(path.name):
        errors = list(crd_validator(doc["kind"]).iter_errors(doc))
        assert errors, f"the CRD accepts {doc['metadata']['name']}"
    offer = parse_text(path.read_text(), path.name)
    assert not offer.resources
    assert {p.resource for p in offer.problems} == {
        "Workload inference/no-address",
        "Workload inference/bad-phase",
        "Node bad-port",
    }


def test_cli_writes_one_file_per_crd_and_prunes_retired_kinds(tmp_path: Path) -> None:
    (tmp_path / "retired.weft.dev.yaml").write_text("# a kind that left the registry\n")
    (tmp_path / "keep-me.txt").write_text("not ours\n")
    assert crds.main(["--out-dir", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([*(crds.file_name(c) for c in crds.all_crds()), "keep-me.txt"])


def test_crds_have_a_status_subresource_printer_columns_and_short_names() -> None:
    """kubectl users see whether a resource was accepted (kubectl get), the controller can
    write status without touching spec, and short names do not clash with Kubernetes' or
    Istio's own (ones kubectl already resolves)."""
    taken = {
        "po",
        "svc",
        "no",
        "ns",
        "deploy",
        "ds",
        "rs",
        "sts",
        "cm",
        "ep",
        "pv",
        "pvc",
        "sa",
        "hpa",
        "pdb",
        "ing",
        "netpol",
        "vs",
        "dr",
        "gw",
        "se",
        "pa",
        "ap",
        "rp",
    }
    seen: set[str] = set()
    for crd in crds.all_crds():
        (v,) = crd["spec"]["versions"]
        assert v["subresources"] == {"status": {}}
        cols = {c["name"]: c["jsonPath"] for c in v["additionalPrinterColumns"]}
        assert cols["Accepted"] == '.status.conditions[?(@.type=="Accepted")].status'
        conditions = v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        assert conditions["conditions"]["items"]["required"] == ["type", "status"]
        for short in crd["spec"]["names"].get("shortNames", []):
            assert short not in taken and short not in seen, short
            seen.add(short)
    assert {"bp", "trl", "wl"} <= seen
