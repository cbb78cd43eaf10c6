"""scripts/bench_placement.py: --from-json redraws what the saved run was."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_placement.py"
LARGE = ROOT / "benchmarks" / "results" / "placement" / "large.json"


def test_a_large_only_json_redraws_large_png_and_md(tmp_path: Path) -> None:
    saved = tmp_path / "saved.json"
    shutil.copy(LARGE, saved)
    assert "paper" not in json.loads(saved.read_text())  # a --large-only run's
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, str(SCRIPT), "--from-json", str(saved), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["large.md", "large.png"]
    assert "594.6" in (out / "large.md").read_text()
