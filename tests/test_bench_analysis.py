"""The benchmark's arithmetic on synthetic records whose answers are known,
the load generator's verdict on a server that answers wrongly, two of the
benchmark's steps run small: the idle keep-alive clients' upgrades and where
steady state starts, and a stopped benchmark's clean-up (the benchmark itself
runs with make bench, not here)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import KRUISE_VARS, PY, ROOT, Load, child_env, stop_when

sys.path.insert(0, str(ROOT / "bench"))
from run import Procs, analyse, idle_keepalive, markdown, percentile


def test_percentile() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert percentile(values, 50) == 501.0
    assert percentile(values, 99.9) == 999.0
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_analyse_counts_failures_gaps_and_switch_times() -> None:
    records: list[list[Any]] = []
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


def test_analyse_compares_gaps_with_steady_state_of_the_same_length() -> None:
    """A 10 ms pause every 2 s in steady state, one per switch window: the
    switch windows' longest gap (10 ms) is what steady state shows over the
    same length of time. A start-up window of 0.1 s rarely holds such a
    pause, so its steady reference is the 1 ms spacing, and a keep-alive
    client that never reaches the new version is reported, not dropped."""
    records = []
    for i in range(60000):  # t = 100 .. 160, one response per ms
        t = 100 + i * 0.001
        if i % 2000 < 10 and i > 500:
            continue  # the pause: 11 ms from one response to the next
        records.append([t, 0.0001, "ka0", "v1" if t < 130.0 else "v2"])
    records.append([140.0, 0.0001, "ka1", "v1"])  # never sees v2
    # In flight as the start-up window begins: not steady state.
    records.append([129.849, 0.5, "new0", "v1"])
    upgrades = [{"launched": 129.85, "switched": 130.0, "critical_ms": float("nan"),
                 "version": 2}]
    result = analyse("synthetic", records, upgrades, steady_from=101.0)
    like_switch = result["longest_gap_steady_like_switch_ms"]
    like_startup = result["longest_gap_steady_like_startup_ms"]
    pause = result["longest_gap_steady_ms"]
    assert abs(pause - 11.0) < 0.01
    assert abs(result["longest_gap_switch_ms"] - pause) < 0.01
    assert like_switch is not None and abs(like_switch["median"] - pause) < 0.01
    assert like_startup is not None and like_startup["median"] < 2.0
    assert result["keepalive_not_reached"] == 1
    assert result["switch_s"]["keepalive_all"] is None
    assert result["latency_ms"]["steady"]["p99.9"] < 1.0  # the 500 ms one is left out
    assert result["latency_samples"]["switch"] < result["latency_samples"]["window"]


def test_the_table_renders_what_analyse_measured() -> None:
    records = [[100 + i * 0.001, 0.0005, f"ka{i % 2}", "v1" if i < 5000 else "v2"]
               for i in range(10000)]
    upgrades = [{"launched": 104.5, "switched": 105.0, "critical_ms": 2.5, "version": 2}]
    result = analyse("synthetic", records, upgrades, steady_from=100.5)
    report = {"when": "now", "machine": "here", "load": "some", "skipped": [],
              "strategies": [{k: v for k, v in result.items() if not k.startswith("_")}],
              "throughput": {"skipped": "no wrk"}, "listeners": {}, "connections": {},
              "idle_keepalive": {}}
    row = next(line for line in markdown(report).splitlines() if line.startswith("| synthetic"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 14, cells
    header = next(line for line in markdown(report).splitlines() if line.startswith("|---"))
    assert header.count("---") == len(cells)
    assert cells[:3] == ["synthetic", "10000", "0"]
    assert cells[-1] == "2.50 (max 2.50)"


def test_the_load_generator_counts_a_body_without_a_version_as_failed(
        load: Callable[..., Load]) -> None:
    """A 200 whose body names no version is no answer of the server under
    test (it used to count as a success of version "?")."""
    class Hello(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # http.server's name for it
            body = b"hello" if self.path == "/serve" else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = load(server.server_address[1], keepalive=1, fresh=1, busybox=0,
                      interval=0.01, duration=1.0).finish()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert result["requests"] > 0 and result["failed"] == result["requests"], result
    assert set(result["failures"]) == {"bad-body"}, result


def test_idle_keepalive_has_every_upgrade_meet_the_idle_connections(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make bench's idle keep-alive clients (1 s between requests): each of
    the 3 upgrades must find every client's connection on the version it
    replaces. Without connection handover each upgrade then closes every one
    of them (a request answered with Connection: close, or an idle
    connection cut at the drain deadline): each client opens one connection
    per upgrade. The upgrades used to follow each other within ~0.3 s, so
    the second and third found the clients still reconnecting: the "off"
    figure counted one upgrade's losses, not three."""
    for key in list(os.environ):  # the children's environment, as conftest's
        if key in KRUISE_VARS or key.startswith("HOTSWAP_"):
            monkeypatch.delenv(key)
    for key, value in child_env().items():
        monkeypatch.setenv(key, value)
    clients = 4
    procs = Procs(tmp_path)
    try:
        result = idle_keepalive(procs, clients=clients)
    finally:
        procs.kill_all()
    on, off = result["on"], result["off"]
    assert on["failed"] == 0 and on["connections"] == clients, result
    assert off["connections"] == clients * 4, result  # one more per client and upgrade
    assert off["failed"] <= clients * 3, result


def test_steady_state_starts_after_the_warm_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steady state is every request after the warm-up (the README's
    definition): it used to start half-way through it."""
    import argparse

    import run

    seen: dict[str, float] = {}
    start = run.Procs.start

    def started(self: run.Procs, label: str, argv: list[str],
                env: dict[str, str] | None = None) -> Any:
        if label.startswith("load-"):
            seen["load"] = time.time()
        return start(self, label, argv, env)

    def analysed(name: str, records: list[list[Any]], upgrades: list[dict[str, float]],
                 steady_from: float, seed: int = 0) -> dict[str, Any]:
        seen["steady_from"] = steady_from
        return {}

    monkeypatch.setattr(run.Procs, "start", started)
    monkeypatch.setattr(run, "analyse", analysed)
    for key, value in child_env().items():
        monkeypatch.setenv(key, value)
    args = argparse.Namespace(warmup=1.0, upgrades=1, interval=0.5, tail=0.2, keepalive=1,
                              fresh=0)
    procs = Procs(tmp_path)
    try:
        run.run_strategy("naive-restart", procs, args)
    finally:
        procs.kill_all()
    assert seen["steady_from"] >= seen["load"] + args.warmup, seen


def hook_cli(procs: list[psutil.Process]) -> bool:
    """Whether the hook's CLI (``hotswap wait-ready``) is among ``procs``."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if "wait-ready" in proc.cmdline():
                return True
    return False


@pytest.mark.parametrize(("signum", "when"), [
    (signal.SIGTERM, "load"), (signal.SIGHUP, "load"), (signal.SIGTERM, "hook")])
def test_a_stopped_bench_leaves_no_process(
        signum: signal.Signals, when: str, tmp_path: Path) -> None:
    """``kill <pid>`` of the benchmark, or its terminal closed, ends it through
    its clean-up. The default action ended it alone: the sidecar and the load
    generator it had started ran on (the sidecar for good). Stopped while an
    upgrade's hook waited, it killed the hook's shell alone, and the CLI the
    shell waited on polled on until its own timeout."""
    out = tmp_path / "bench.out"
    # The sidecar and the load generator under way, or the hook's CLI (their
    # pids; the hook asks the CLI at once: HOTSWAP_MIGRATE_FAST=0).
    code, alive = stop_when(
        [PY, str(ROOT / "bench/run.py"), "--strategies", "hotswap", "--upgrades", "1",
         "--quick", "--out", str(tmp_path / "results")],
        child_env(HOTSWAP_MIGRATE_FAST="0"), out, signum, "under load",
        lambda started: len(started) >= 2 and (when == "load" or hook_cli(started)),
        r"logs and raw records kept in (\S+)")
    assert code == 128 + signum, out.read_text()
    assert not alive, f"left running: {alive}\n{out.read_text()}"


def test_the_bench_ends_a_child_it_did_not_record() -> None:
    """A stop that comes between a child's fork and its record in ``Procs``
    (the exception out of ``Popen``) leaves a child ``kill_all()`` does not
    know: the last clean-up ends every child the bench still has. In a
    process of its own: here it would end this test run's children too."""
    probe = (f"import subprocess, sys; sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
             "import run\n"
             "child = subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL)\n"
             "run.kill_children()\n"
             "alive = os.path.exists(f'/proc/{child.pid}')\n"  # not killed and reaped
             "if alive:\n"  # then still this child: end it here
             "    child.kill()\n"
             "    child.wait()\n"
             "print(alive)\n")
    done = subprocess.run([PY, "-c", "import os\n" + probe], capture_output=True,
                          text=True, timeout=30)
    assert done.stdout == "False\n", done.stdout + done.stderr


def test_the_bench_ends_the_group_of_a_hook_it_did_not_get_back() -> None:
    """A stop inside the hook's ``Popen`` (after its fork) never reaches
    ``run_hook()``'s clean-up, and the shell, in a session of its own, goes
    on to start the CLI: killing the shell alone left that CLI polling until
    its own timeout (2 of 3 bench runs stopped the moment the hook's shell
    showed up). The last clean-up kills the group such a child leads. In a
    process of its own: here it would end this test run's children too."""
    probe = (f"import os, subprocess, sys; sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
             "import psutil, run\n"
             "hook = subprocess.Popen(['sh', '-c', 'sleep 60 & echo $!; wait'],\n"
             "                        stdout=subprocess.PIPE, start_new_session=True)\n"
             "cli = psutil.Process(int(hook.stdout.readline()))\n"  # the shell's child
             "run.kill_children()\n"
             "try:\n"
             "    cli.wait(timeout=10)\n"  # gone (reparented: not ours to reap)
             "    print('gone')\n"
             "except psutil.TimeoutExpired:\n"
             "    cli.kill()\n"  # left running: end it here, by its pid
             "    print('left running')\n")
    done = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout == "gone\n", done.stdout + done.stderr
