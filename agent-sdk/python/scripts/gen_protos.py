"""Generates the Python stubs of Muster's proto files into ``muster/v1``.

Usage: ``python scripts/gen_protos.py [OUT_DIR]``. Without an argument the
stubs are written into the package (``agent-sdk/python``); the stale-stub
test passes a temporary directory and compares the result with the
committed files.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parent
PROTO_ROOT = PACKAGE_ROOT.parent.parent / "proto"
PROTOS = ["muster/v1/agent.proto", "muster/v1/task.proto", "muster/v1/fleet.proto", "muster/v1/admin.proto"]


def generate(out_dir: Path) -> list[Path]:
    """Writes ``muster/v1/*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` under ``out_dir``."""
    target = out_dir / "muster" / "v1"
    target.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    init = target / "__init__.py"
    init.write_text('"""Generated from proto/muster/v1 by scripts/gen_protos.py; do not edit."""\n')
    return sorted(p for p in target.iterdir() if p.is_file())


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_ROOT)
