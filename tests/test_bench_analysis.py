"""The benchmark's arithmetic on synthetic records whose answers are known
(the benchmark itself runs with make bench, not here)."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from run import analyse, percentile


def test_percentile() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert percentile(values, 50) == 501.0
    assert percentile(values, 99.9) == 999.0
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_analyse_counts_failures_gaps_and_switch_times() -> None:
    records = []
    # Two keep-alive clients and one new-connection client, one request per
    # 10 ms each, 1 ms latency, from t=100 to t=110; the switch to v2 at 105.
    for i in range(1000):
        t = 100 + i * 0.01
        version = "v1" if t < 105.0 else "v2"
        records.append([t, 0.001, "ka0", version])
        records.append([t + (0.02 if version == "v2" else 0), 0.001, "ka1", version])
        records.append([t, 0.001, "new0", version])
    # A 0.5 s outage with refused connections for new0 right after the switch.
    records = [r for r in records if not (r[2] == "new0" and 105.0 <= r[0] < 105.5)]
    records += [[105.0 + k * 0.05, 0.0001, "new0", "!refused"] for k in range(10)]
    # Silences: 40 ms while the new process starts, 70 ms inside the switch window.
    records = [r for r in records if r[3].startswith("!")
               or not (104.7 <= r[0] < 104.73 or 105.2 <= r[0] < 105.26)]
    result = analyse("synthetic", records,
                     [{"launched": 104.5, "switched": 105.0, "critical_ms": 2.0,
                       "version": 2}], steady_from=100.5)
    assert result["failed"] == 10 and result["failures"] == {"refused": 10}
    assert result["failures_per_upgrade"] == 10
    assert abs(result["switch_s"]["keepalive_first"] - 0.001) < 1e-6
    assert abs(result["switch_s"]["keepalive_all"] - 0.021) < 1e-6
    assert abs(result["switch_s"]["new_connection"] - 0.501) < 1e-6
    assert abs(result["longest_gap_steady_ms"] - 10.0) < 0.5
    assert abs(result["longest_gap_startup_ms"] - 40.0) < 0.5
    assert abs(result["longest_gap_switch_ms"] - 70.0) < 0.5
    assert abs(result["longest_gap_ms"] - 70.0) < 0.5
    assert result["critical_section_ms"] == {"median": 2.0, "max": 2.0}
    assert abs(result["latency_ms"]["steady"]["p50"] - 1.0) < 1e-6
