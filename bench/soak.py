"""``make soak``: hundreds of consecutive hot upgrades of the sample sidecar
under load, on 127.0.0.1, bounded in count and time.

Each upgrade starts the next version (no Kruise variables: the new process
takes over from the running one), waits until it serves and its predecessor
is gone, and records for the serving process: its descriptors other than connections
(every non-socket descriptor plus the listening sockets, from /proc: a leaked
listener, pipe or event loop shows as growth here, whatever the load does to
the connection count), its RSS (psutil), and
the upgrade time (launch to "serving, predecessor gone"). The load generator
(bench/loadgen.py: keep-alive, busybox and new-connection clients, never
retrying) runs throughout; its failures are the headline number.

Writes ``<out>/soak.json`` and ``<out>/soak.md``. Exit status 1 if any request
failed, a descriptor leaked, or an upgrade did not complete.

``--max-seconds`` bounds the whole run: every wait is bounded by what is left
of it (less a few seconds kept for stopping the load and the last sidecar);
when it is spent the soak stops, says so ("soak: time limit reached ...") and
exits 1; SIGTERM stops it too (exit status 143). Every process it starts is
ended by its pid and reaped, and dies with it if it is killed
(PR_SET_PDEATHSIG). Its working directory (every process's log) is removed
after a passing run and kept, with its path printed, after a failing one or
with ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import prctl
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hotswap.control  # noqa: E402  (the repository's own package)

PY = sys.executable
SIDECAR = ROOT / "examples/sidecar_server/main.py"
LOADGEN = ROOT / "bench/loadgen.py"
# Seconds of --max-seconds kept for stopping the load generator (its clients
# finish within --timeout + 2 s) and the last sidecar once the upgrades stop.
STOP_GRACE = 15.0


def die_with(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child is SIGKILLed when ``parent`` (this process)
    dies, even by SIGKILL, so nothing outlives the soak. Checked after the
    prctl, in case the parent died between the fork and it."""
    def preexec() -> None:
        prctl.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


class Terminated(Exception):
    """SIGTERM: the soak stops like a failed one (children ended by pid and
    reaped, logs kept) and exits 143."""


def on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, lambda *_: None)  # once: the stopping is not interrupted
    raise Terminated


def status(name: str) -> Any:
    try:
        return asyncio.run(hotswap.control.query_status(
            hotswap.control.control_address(name), timeout=2))
    except (OSError, hotswap.HotswapError):
        return None


def wait_serving(name: str, version: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(name)
        if st and st.version == version and st.state == "serving" \
                and st.predecessor in ("none", "gone"):
            return st
        time.sleep(0.01)
    raise RuntimeError(f"{version} not serving within {timeout:.1f}s")


def _listening_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    inodes.add(fields[9])
    with open("/proc/net/unix") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            if int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON
                inodes.add(fields[6])
    return inodes


def fds_without_connections(pid: int) -> int:
    """The process's descriptors that are not connections: every non-socket
    descriptor plus the listening sockets (TCP and Unix). Connections come and
    go with the load; a leak of anything the handover touches shows here."""
    listening = _listening_inodes()
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed while we looked
        if not target.startswith("socket:[") or target[8:-1] in listening:
            count += 1
    return count


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrades", type=int, default=300)
    parser.add_argument("--keepalive", type=int, default=4)
    parser.add_argument("--fresh", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "soak")
    parser.add_argument("--max-seconds", type=float, default=1200,
                        help="time limit of the whole run, every wait included")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (every process's log) instead "
                             "of removing it after a passing run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="hotswap-soak-"))
    ok = False
    try:
        ok = soak(args, tmp)
    except Terminated:
        print("soak: SIGTERM, stopped", flush=True)
        print("soak: FAIL", flush=True)
        return 128 + signal.SIGTERM
    finally:
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"soak: logs kept in {tmp}", flush=True)
    return 0 if ok else 1


def soak(args: argparse.Namespace, tmp: Path) -> bool:
    """The run; True if it passed. Every wait is bounded by what is left of
    ``--max-seconds``; every process started is ended by its pid and reaped."""
    name = f"soak-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[bytes]] = []
    max_seconds: float = args.max_seconds
    deadline = time.monotonic() + max_seconds
    grace = min(STOP_GRACE, max_seconds / 4)

    def left(reserve: float = 0.0) -> float:
        """Seconds left of --max-seconds, less ``reserve``."""
        return max(0.0, deadline - reserve - time.monotonic())

    def bounded(limit: float) -> float:
        """A wait of at most ``limit`` s that leaves the stopping time."""
        return min(limit, left(grace))

    def start(argv: list[str], label: str) -> subprocess.Popen[bytes]:
        with open(tmp / f"{label}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                    preexec_fn=die_with(os.getpid()))
        procs.append(proc)
        return proc

    def stop(proc: subprocess.Popen[bytes], label: str) -> None:
        """SIGTERM, then (below) SIGKILL if it has not exited within 60 s or
        what is left of the time limit."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        wait = min(60.0, left())
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            print(f"soak: {label} (pid {proc.pid}) still running {wait:.1f}s after "
                  "SIGTERM, killed", flush=True)

    def sidecar(n: int) -> subprocess.Popen[bytes]:
        return start([PY, str(SIDECAR), "--name", name, "--version", f"v{n}", "--port", "0"],
                     f"v{n}")

    samples: list[dict[str, float]] = []
    ok = True
    load: subprocess.Popen[bytes] | None = None
    current: subprocess.Popen[bytes] | None = None
    n = 0
    try:
        try:
            current = sidecar(0)
            st = wait_serving(name, "v0", bounded(30))
            port = int(st.listeners[0].address.rsplit(":", 1)[1])
            load = start([PY, str(LOADGEN), "--port", str(port), "--keepalive",
                          str(args.keepalive), "--fresh", str(args.fresh), "--pace", "0.002",
                          "--duration", str(args.max_seconds), "--no-records",
                          "--out", str(tmp / "load.json")],
                         "load")
            for n in range(1, args.upgrades + 1):
                if left(grace) <= 0:
                    print(f"soak: time limit reached after {n - 1} upgrades "
                          f"(--max-seconds {args.max_seconds:g})", flush=True)
                    ok = False
                    break
                t0 = time.monotonic()
                new = sidecar(n)
                st = wait_serving(name, f"v{n}", bounded(60))
                elapsed = time.monotonic() - t0
                wait = bounded(60)
                try:
                    code = current.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    raise RuntimeError(f"v{n - 1} still running {wait:.1f}s after v{n} "
                                       "served") from None
                if code != 0:
                    print(f"soak: v{n - 1} exited {code}", flush=True)
                    ok = False
                current = new
                ps = psutil.Process(current.pid)
                samples.append({"upgrade": n, "seconds": round(elapsed, 4),
                                "fds": fds_without_connections(current.pid),
                                "rss_mb": round(ps.memory_info().rss / 1e6, 2)})
                if n % 25 == 0:
                    print(f"soak: {n} upgrades, last {elapsed:.3f}s, fds "
                          f"{samples[-1]['fds']}, rss {samples[-1]['rss_mb']} MB", flush=True)
        except (RuntimeError, OSError, subprocess.SubprocessError, psutil.Error) as exc:
            what = f"upgrade {n} did not complete" if n else "v0 did not start"
            if left(grace) <= 0:
                print(f"soak: time limit reached after {max(n - 1, 0)} upgrades "
                      f"(--max-seconds {args.max_seconds:g}; {what}: {exc})", flush=True)
            else:
                print(f"soak: {what}: {exc}", flush=True)
            ok = False
        if load is not None:
            # Its last round: each client makes one more request, started
            # now, so that a connection the last predecessor cut (or moved
            # wrongly) shows as a failure instead of going unasked.
            if load.poll() is None:
                load.send_signal(signal.SIGUSR1)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    load.wait(timeout=min(30.0, left()))
            stop(load, "the load generator")
        if current is not None:
            stop(current, "the serving sidecar")
    finally:
        signal.signal(signal.SIGTERM, lambda *_: None)  # a SIGTERM now: we are stopping
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"soak: pid {proc.pid} still there 10s after SIGKILL", flush=True)
                ok = False
    try:
        result = json.loads((tmp / "load.json").read_text())["summary"]
    except (OSError, ValueError) as exc:
        print(f"soak: no load summary ({exc}); no report", flush=True)
        result = None
    if result is None or not samples:
        if result is not None:
            print("soak: no upgrade completed; no report", flush=True)
        print("soak: FAIL", flush=True)
        return False
    failures: dict[str, int] = result["failures"]
    times = [s["seconds"] for s in samples]
    fds = [s["fds"] for s in samples]
    rss = [s["rss_mb"] for s in samples]
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python "
                   f"{platform.python_version()}",
        "network": ("a network namespace of its own (loopback only)"  # own-netns.sh
                    if os.environ.get("HOTSWAP_NETNS") == "own"
                    else "the machine's network namespace"),
        "upgrades": len(samples), "requests": result["requests"],
        "failed": sum(failures.values()), "failures": failures,
        "upgrade_seconds": {"p50": statistics.median(times), "p90": percentile(times, 90),
                            "p99": percentile(times, 99), "max": max(times)},
        "fds": {"first": fds[0], "last": fds[-1], "min": min(fds), "max": max(fds)},
        "rss_mb": {"first": rss[0], "last": rss[-1], "min": min(rss), "max": max(rss)},
        "samples": samples,
    }
    leak = len(set(fds)) != 1
    if result.get("died"):
        print(f"soak: load clients died (their load stopped): {result['died']}", flush=True)
        ok = False
    if report["failed"] or leak or len(samples) < args.upgrades:
        ok = False
    (args.out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    step = max(1, len(samples) // 10)
    lines = [f"Soak measured {report['when']} on {report['machine']}, in "
             f"{report['network']}; command: "
             f"`make soak` ({args.upgrades} upgrades, {args.keepalive} keep-alive and "
             f"{args.fresh} new-connection clients, no retries).", "",
             f"- upgrades: {report['upgrades']}, requests: {report['requests']}, "
             f"failed: {report['failed']} {failures or ''}",
             "- upgrade time (launch to serving with the predecessor gone): p50 "
             f"{report['upgrade_seconds']['p50']:.3f} s, p90 "
             f"{report['upgrade_seconds']['p90']:.3f} s, p99 "
             f"{report['upgrade_seconds']['p99']:.3f} s, max "
             f"{report['upgrade_seconds']['max']:.3f} s",
             f"- descriptors of the serving process (all but connections): "
             f"min {min(fds)}, max {max(fds)}",
             f"- RSS of the serving process: min {min(rss)} MB, max {max(rss)} MB", "",
             "| upgrade | upgrade time (s) | descriptors | RSS (MB) |", "|---|---|---|---|"]
    for sample in samples[step - 1::step]:
        lines.append(f"| {sample['upgrade']} | {sample['seconds']:.3f} | {sample['fds']} "
                     f"| {sample['rss_mb']} |")
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("soak: PASS" if ok else "soak: FAIL", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
