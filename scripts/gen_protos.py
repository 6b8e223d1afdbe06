#!/usr/bin/env python3
"""Generate the committed Python code for the wire format from ``protos/secureinfer/v1``.

Every ``*.proto`` under ``protos/secureinfer/v1/`` is compiled with the protoc bundled in
``grpcio-tools`` into ``secureinfer/v1/`` (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``)
plus a fixed ``__init__.py``. The protos import each other as
``secureinfer/v1/<name>.proto`` and generation runs with ``-Iprotos`` into the repository
root, so generated imports read ``from secureinfer.v1 import common_pb2`` and resolve
inside the package.

Usage::

    python scripts/gen_protos.py           # regenerate secureinfer/v1/ in place
    python scripts/gen_protos.py --check   # regenerate into a temp dir, diff, exit 1 on drift

The generated code pins the generator's versions: ``*_pb2.py`` calls
``ValidateProtobufRuntimeVersion`` with the protoc version, and ``*_pb2_grpc.py`` checks
``grpcio >= GRPC_GENERATED_VERSION``; ``pyproject.toml`` floors must match those.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_REL = Path("secureinfer") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

INIT_TEXT = '''"""Generated protobuf and gRPC code of the secureinfer.v1 wire format.

Do not edit: regenerate with ``python scripts/gen_protos.py`` from ``protos/secureinfer/v1``.
"""
'''


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every ``.proto`` of the package, relative to ``proto_root``, sorted."""
    return sorted(p.relative_to(proto_root) for p in (proto_root / PACKAGE_REL).glob("*.proto"))


def generate(out_root: Path, *, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto into ``out_root/secureinfer/v1``; return the files written (relative)."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    protos = proto_files(proto_root)
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root / PACKAGE_REL}")
    (out_root / PACKAGE_REL).mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in protos),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    (out_root / PACKAGE_REL / "__init__.py").write_text(INIT_TEXT)
    return _generated(out_root)


def _generated(root: Path) -> list[Path]:
    """The generated files (and ``__init__.py``) present under ``root/secureinfer/v1``."""
    pkg = root / PACKAGE_REL
    if not pkg.is_dir():
        return []
    files = [p for p in pkg.iterdir() if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)]
    if (pkg / "__init__.py").exists():
        files.append(pkg / "__init__.py")
    return sorted(p.relative_to(root) for p in files)


def check(*, repo_root: Path = ROOT, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Regenerate into a temp dir and compare with ``repo_root``; return the differences."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="secureinfer-protos-") as tmp:
        fresh_root = Path(tmp)
        fresh = set(generate(fresh_root, proto_root=proto_root))
        committed = set(_generated(repo_root))
        for rel in sorted(committed - fresh):
            problems.append(f"stale generated file (no proto produces it): {rel}")
        for rel in sorted(fresh):
            new = (fresh_root / rel).read_text()
            path = repo_root / rel
            if not path.exists():
                problems.append(f"missing generated file: {rel}")
                continue
            old = path.read_text()
            if old != new:
                diff = "".join(
                    difflib.unified_diff(
                        old.splitlines(keepends=True),
                        new.splitlines(keepends=True),
                        fromfile=f"committed/{rel}",
                        tofile=f"regenerated/{rel}",
                        n=1,
                    )
                )
                problems.append(f"out of date: {rel}\n{diff[:4000]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and fail if the committed code differs",
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("generated code is out of date: run python scripts/gen_protos.py", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    for stale in _generated(ROOT):
        (ROOT / stale).unlink()  # drop output of protos that no longer exist
    written = generate(ROOT)
    for rel in written:
        print(rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
