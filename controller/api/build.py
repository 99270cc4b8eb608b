"""Compile controller/api/proto/**/*.proto into controller/api/gen/ with grpcio-tools.

Run by `make setup` and by the wheel build (setup.py). Idempotent: skips when every
generated file is newer than its source.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository (or unpacked sdist) root
PROTO_DIR = Path("controller/api/proto")
GEN_DIR = Path("controller/api/gen")


def _outputs(proto: Path) -> list[Path]:
    rel = proto.relative_to(PROTO_DIR).with_suffix("")
    base = GEN_DIR / rel
    return [base.with_name(base.name + "_pb2.py"), base.with_name(base.name + "_pb2_grpc.py")]


def _stamp(generated: Path) -> str | None:
    """The protobuf version a generated module was made for ("Protobuf Python Version")."""
    with generated.open() as f:
        for line in f:
            if line.startswith("# Protobuf Python Version:"):
                return line.split(":", 1)[1].strip()
            if not line.startswith("#"):
                return None
    return None


def _loadable(generated: Path) -> bool:
    """Code generated for a newer protobuf than the one installed refuses to import;
    such files (made by another grpcio-tools, say in an isolated wheel build) are stale."""
    import google.protobuf

    def major_minor(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())

    stamp = _stamp(generated)
    return stamp is None or major_minor(stamp) <= major_minor(google.protobuf.__version__)


def build(root: Path = ROOT, *, force: bool = False) -> list[Path]:
    from grpc_tools import protoc  # build-time dependency only

    protos = sorted((root / PROTO_DIR).rglob("*.proto"))
    stale = [
        p
        for p in protos
        if force
        or any(
            not (root / o).exists()
            or (root / o).stat().st_mtime < p.stat().st_mtime
            or (o.name.endswith("_pb2.py") and not _loadable(root / o))
            for o in _outputs(p.relative_to(root))
        )
    ]
    if not stale:
        return []
    gen = root / GEN_DIR
    gen.mkdir(parents=True, exist_ok=True)
    # Generated modules import each other as `controller.api.gen.<pkg>`; that needs the
    # proto include root mapped onto that package path, hence the --proto_path mapping.
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"--proto_path=controller/api/gen={root / PROTO_DIR}",
        f"--proto_path={include}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        *[f"{root / PROTO_DIR}/{p.relative_to(root / PROTO_DIR)}" for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    for d in [gen, *[p for p in gen.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return protos


if __name__ == "__main__":
    built = build(force="--force" in sys.argv)
    if built:
        print(f"compiled {len(built)} proto file(s) into {GEN_DIR}")
