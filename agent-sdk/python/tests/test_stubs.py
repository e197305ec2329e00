"""The committed stubs in ``muster/v1`` are what ``scripts/gen_protos.py``
makes from ``proto/`` today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import PACKAGE_ROOT


def test_the_committed_stubs_match_the_proto_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(PACKAGE_ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True
    )
    fresh_dir = tmp_path / "muster" / "v1"
    committed_dir = PACKAGE_ROOT / "muster" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.is_file()}
    assert sorted(committed) == sorted(fresh), "stub files added or removed: run scripts/gen_protos.sh"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not stale, f"stale stubs {stale}: run scripts/gen_protos.sh and commit the result"
