"""A short soak in make test (make soak runs the long one): consecutive
upgrades under load, 0 failed requests, a constant descriptor count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_short_soak(tmp_path: Path) -> None:
    """Invariants 1, 5, 7 over 15 consecutive upgrades under load."""
    result = subprocess.run([sys.executable, str(ROOT / "bench/soak.py"), "--upgrades", "15",
                             "--out", str(tmp_path), "--max-seconds", "120"],
                            capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["upgrades"] == 15 and report["failed"] == 0, report
    assert report["fds"]["min"] == report["fds"]["max"], report["fds"]
    assert report["requests"] > 100
