"""``make bench``: hotswap against the ways people upgrade today, in one run.

Every strategy gets the same load (bench/loadgen.py, a separate process:
keep-alive clients back to back, the 100 ms busybox client, new-connection
clients; nothing retries) and the same number of upgrades of the sample
sidecar (same aiohttp + uvloop app), all on 127.0.0.1:

- ``hotswap``: the library; each new version started the Kruise way
  (``SIDECARSET_VERSION``/``_ALT``), its PostStart hook (migrate.sh) waited
  for, then the old slot reset (SIGTERM);
- ``naive-restart``: stop v1 (SIGTERM, aiohttp's graceful shutdown), start v2
  on the same port;
- ``reuseport-overlap``: start v2 with SO_REUSEPORT beside v1, wait until it
  listens, then stop v1 gracefully with aiohttp's own shutdown.

Then: steady-state throughput with and without hotswap (wrk; alternating
rounds, and both servers side by side at the same time), and the handover
time against the number of listeners and of idle keep-alive connections.

Writes ``docs/bench/results.json``, ``docs/bench/results.md`` and one
``docs/bench/timeline-<strategy>.png`` per strategy.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import psutil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench"
PY = sys.executable
SIDECAR = ROOT / "examples/sidecar_server/main.py"
PLAIN = ROOT / "bench/plain_server.py"
LOADGEN = ROOT / "bench/loadgen.py"
CRITICAL_RE = re.compile(r"hello at ([\d.]+), confirmed \+([\d.]+) ms, "
                         r"stopped accepting \+([\d.]+) ms")
# A switch window: from just before the switch (the handover critical section
# is a few ms) to 1 s after it. What precedes it is the new process starting.
WINDOW_BEFORE, WINDOW_AFTER = 0.05, 1.0
# The switch itself, for latency: a 1 s window's percentiles are mostly the
# ordinary traffic after the switch.
SHORT_AFTER = 0.25
HELLO_SENT_RE = re.compile(r"hello sent at ([\d.]+)")
# Draws of steady-state stretches as long as the windows a longest gap is
# compared with (a maximum grows with the time it is taken over).
REFERENCE_DRAWS = 400


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_answering(port: int, version: str, timeout: float = 20) -> None:
    """Until GET /serve on ``port`` is answered by ``version``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /serve HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
            if f"version({version})".encode() in data:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{version} did not answer on port {port} within {timeout}s")


class Procs:
    def __init__(self, tmp: Path, separate: bool = False) -> None:
        self.tmp = tmp
        # separate: each process in a session of its own, hence (with the
        # kernel's autogroups, outside any CPU cgroup) a scheduling group of
        # its own, as each container of a pod is: CPU is shared between the
        # groups first, and a thread's nice value or SCHED_IDLE only ranks it
        # within its group.
        self.separate = separate
        self.all: list[subprocess.Popen[bytes]] = []

    def start(self, label: str, argv: list[str], env: dict[str, str] | None = None
              ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp / f"{label}-{len(self.all)}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                    start_new_session=self.separate)
        self.all.append(proc)
        return proc, log

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def kill_all(self) -> None:
        for proc in self.all:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_hook(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """scripts/migrate.sh, as the kubelet runs a PostStart hook. In a session
    of its own, so that a stop (or its timeout) ends the CLI it waits on
    too: ``subprocess.run`` would kill the shell alone, and the CLI would
    poll on until its own timeout."""
    with subprocess.Popen(["sh", str(ROOT / "scripts/migrate.sh")], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
                          start_new_session=True) as hook:
        try:
            out, err = hook.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(hook.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(hook.args, hook.returncode, out, err)


def kill_children() -> None:
    """The bench's last clean-up: SIGKILL and reap every child this process
    still has, such as one a stop came for between its fork and its record
    in :class:`Procs` (the exception out of ``Popen``), or a wrk run. A child
    that leads a process group of its own (a hook's shell, started in a
    session of its own: a stop inside its ``Popen`` never reached
    :func:`run_hook`'s clean-up) has its whole group killed: the CLI the
    shell had started polled on until its own timeout. Unreaped, a child's
    pid, hence the id of the group it leads, cannot be another process's."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired,
                                 ProcessLookupError):
            if os.getpgid(child.pid) == child.pid:  # its own group, not ours
                os.killpg(child.pid, signal.SIGKILL)
            child.kill()
            child.wait(timeout=10)


NETWORKS = {"own": "a network namespace of its own (loopback only)",
            "host": "the machine's network namespace"}


# ------------------------------------------------------------------ strategies

# Reference peers from Debian (optional): the same answer as the sample
# sidecar, so the load generator sees which version answered.
NGINX_CONF = """worker_processes 1;
pid {tmp}/nginx.pid;
error_log stderr notice;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/plain;
            return 200 "This is version({version}) sidecar";
        }}
    }}
}}
"""

HAPROXY_CONF = """global
    nbthread 1
    stats socket {tmp}/haproxy.sock mode 600 level admin expose-fd listeners
defaults
    mode http
    option http-keep-alive
    timeout client 30s
    timeout connect 5s
    timeout server 30s
frontend sidecar
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain \
        string "This is version({version}) sidecar"
"""


class PeerSpec(NamedTuple):
    binary: str
    conf: str  # file name
    template: str
    argv: Callable[[str, Path, Path], list[str]]  # (binary, dir, conf)
    reload: signal.Signals


PEERS = {
    "nginx-reload": PeerSpec(
        "nginx", "nginx.conf", NGINX_CONF,
        lambda binary, d, conf: [binary, "-p", f"{d}/", "-c", str(conf), "-e", "stderr"],
        signal.SIGHUP),  # new workers; the old ones finish gracefully
    "haproxy-reload": PeerSpec(
        "haproxy", "haproxy.cfg", HAPROXY_CONF,
        lambda binary, d, conf: [binary, "-W", "-db", "-f", str(conf)],
        signal.SIGUSR2),  # the default seamless reload: the new worker gets the listeners
}


def autogroups_apply() -> bool:
    """Do sessions get scheduling groups of their own here (autogroups are on
    and this process sits in the root CPU cgroup, where they apply)?"""
    try:
        enabled = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return False
    v1 = [line for line in lines if "cpu" in line.split(":")[1].split(",")]
    path = (v1 or [line for line in lines if line.startswith("0::")] or ["::?"])[0]
    return enabled and path.split(":", 2)[2] == "/"


def peer_binary(strategy: str) -> str | None:
    name = PEERS[strategy].binary
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)),
        None)


class Peer:
    """nginx or HAProxy in master-worker mode, upgraded by its reload signal:
    nginx SIGHUP (new workers, old ones finish gracefully), HAProxy SIGUSR2
    (its default seamless reload: the new worker gets the listeners)."""

    def __init__(self, strategy: str, procs: Procs, port: int) -> None:
        self.strategy, self.procs, self.port = strategy, procs, port
        self.spec = PEERS[strategy]
        binary = peer_binary(strategy)
        assert binary is not None
        self.binary = binary
        self.dir = procs.tmp / strategy
        self.dir.mkdir(exist_ok=True)
        self.conf = self.dir / self.spec.conf
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, version: str) -> None:
        self.conf.write_text(self.spec.template.format(tmp=self.dir, port=self.port,
                                                       version=version))

    def start(self, version: str) -> subprocess.Popen[bytes]:
        self.write(version)
        self.proc, _ = self.procs.start(self.strategy,
                                        self.spec.argv(self.binary, self.dir, self.conf))
        return self.proc

    def reload(self, version: str) -> None:
        assert self.proc is not None
        self.write(version)
        self.proc.send_signal(self.spec.reload)


def run_strategy(name: str, procs: Procs, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    sidecar_name = f"bench-{uuid.uuid4().hex[:8]}"
    upgrades: list[dict[str, float]] = []

    def hotswap_start(n: int) -> tuple[subprocess.Popen[bytes], Path]:
        env = {"SIDECARSET_VERSION": str(n), "SIDECARSET_VERSION_ALT": str(n - 1)}
        return procs.start(f"hotswap-v{n}", [PY, str(SIDECAR), "--version", f"v{n}",
                                             "--port", str(port), "--name", sidecar_name],
                           env)

    def plain_start(n: int, reuse: bool) -> tuple[subprocess.Popen[bytes], Path]:
        argv = [PY, str(PLAIN), "--version", f"v{n}", "--port", str(port)]
        return procs.start(f"{name}-v{n}", argv + (["--reuse-port"] if reuse else []))

    reuse = name == "reuseport-overlap"
    peer = Peer(name, procs, port) if name in PEERS else None
    if peer is not None:
        current, current_log = peer.start("v1"), Path()
    else:
        current, current_log = (hotswap_start(1) if name == "hotswap"
                                else plain_start(1, reuse))
    wait_answering(port, "v1")
    out = procs.tmp / f"load-{name}.json"
    duration = args.warmup + args.upgrades * args.interval + args.tail
    load, _ = procs.start(f"load-{name}", [
        PY, str(LOADGEN), "--port", str(port), "--keepalive", str(args.keepalive),
        "--busybox", "1", "--fresh", str(args.fresh), "--duration", str(duration),
        "--out", str(out)])
    began = time.time()
    time.sleep(args.warmup)
    for n in range(2, args.upgrades + 2):
        slot_at = began + args.warmup + (n - 2) * args.interval
        time.sleep(max(0.0, slot_at - time.time()))
        launched = time.time()
        if name == "hotswap":
            new, new_log = hotswap_start(n)
            hook = run_hook({"SIDECARSET_VERSION": str(n),
                             "SIDECARSET_VERSION_ALT": str(n - 1),
                             "HOTSWAP_NAME": sidecar_name, "HOTSWAP_CLI": f"{PY} -m hotswap"})
            if hook.returncode != 0:
                raise RuntimeError(f"hook failed: {hook.stdout}{hook.stderr}")
            match = logged(current_log, CRITICAL_RE, "old side logged no critical section")
            hello = float(match.group(1))
            switched = hello + float(match.group(2)) / 1e3
            # From the successor's sending its hello (its log, once ready;
            # the same clock) to the old side's last accept: the old side's
            # own "hello at" is when its loop got to read it. The successor
            # logs it as it serves, which may come just after the hook ended.
            sent = logged(new_log, HELLO_SENT_RE, "the successor logged no hello")
            critical = (hello + float(match.group(3)) / 1e3 - float(sent.group(1))) * 1e3
            procs.stop(current)  # Kruise's reset of the old slot
        elif peer is not None:
            switched = launched
            peer.reload(f"v{n}")
            wait_answering(port, f"v{n}")
            new, new_log, critical = current, current_log, float("nan")
        elif name == "naive-restart":
            switched = launched
            procs.stop(current)
            new, new_log = plain_start(n, False)
            wait_answering(port, f"v{n}")
            critical = float("nan")
        else:
            new, new_log = plain_start(n, True)
            deadline = time.monotonic() + 20
            while b"listening" not in new_log.read_bytes():
                if time.monotonic() > deadline or new.poll() is not None:
                    raise RuntimeError("reuseport successor did not listen")
                time.sleep(0.01)
            switched = time.time()
            procs.stop(current)
            critical = float("nan")
        upgrades.append({"launched": launched, "switched": switched, "critical_ms": critical,
                         "version": n})
        current, current_log = new, new_log
        say(f"{name}: upgrade to v{n} done")
    load.wait(timeout=duration + 30)
    procs.stop(current)
    load_out = json.loads(out.read_text())
    died = load_out["summary"].get("died")
    if died:  # their load stopped: what they did not send would read as nothing lost
        raise RuntimeError(f"{name}: load clients died: {died}")
    records = load_out["records"]  # the raw records, not the summary
    # Steady state: every request after the warm-up (not half-way through it).
    return analyse(name, records, upgrades, began + args.warmup)


def logged(log: Path, pattern: re.Pattern[str], missing: str,
           timeout: float = 10) -> re.Match[str]:
    """The first match of ``pattern`` in ``log``, once the process has
    written it (up to ``timeout`` s); RuntimeError(``missing``) if not."""
    deadline = time.monotonic() + timeout
    while (match := pattern.search(log.read_text())) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(missing)
        time.sleep(0.01)
    return match


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _version(answer: str) -> int:
    return int(answer[1:]) if answer[:1] == "v" and answer[1:].isdigit() else -1


def analyse(name: str, records: list[list[Any]], upgrades: list[dict[str, float]],
            steady_from: float, seed: int = 0) -> dict[str, Any]:
    """Records ``[start, latency, client, answer]`` (answer: the version,
    or ``!kind`` for a failure) against the upgrades' launch and switch
    times."""
    # The switch window surrounds the switch itself; the start-up window is the
    # time the new process spends starting before it (every strategy pays for
    # a process start; the switch is what differs).
    switch = [(u["switched"] - WINDOW_BEFORE, u["switched"] + WINDOW_AFTER) for u in upgrades]
    short = [(u["switched"] - WINDOW_BEFORE, u["switched"] + SHORT_AFTER) for u in upgrades]
    startup = [(u["launched"], u["switched"] - WINDOW_BEFORE) for u in upgrades
               if u["switched"] - WINDOW_BEFORE > u["launched"]]
    windows = _merge(switch + startup)

    def within(t: float, spans: list[tuple[float, float]]) -> bool:
        return any(a <= t <= b for a, b in spans)

    def touches(a: float, b: float) -> bool:  # [a, b] overlaps a window
        return any(a <= y and b >= x for x, y in windows)

    failures = Counter(r[3][1:] for r in records if r[3].startswith("!"))
    ok = [r for r in records if not r[3].startswith("!")]
    # Steady state: requests that overlap no window (one in flight as a
    # window begins is not steady).
    steady = [r[1] * 1e3 for r in ok if r[0] >= steady_from and not touches(r[0], r[0] + r[1])]
    window = [r[1] * 1e3 for r in ok if within(r[0], switch)]
    at_switch = [r[1] * 1e3 for r in ok if within(r[0], short)]
    starting = [r[1] * 1e3 for r in ok if within(r[0], startup) and not within(r[0], switch)]

    # Gaps between successful responses (by their end), each placed at its
    # start.
    done = sorted(r[0] + r[1] for r in ok)
    gaps = [(b - a, a) for a, b in itertools.pairwise(done)]
    starts = [at for _, at in gaps]
    sizes = [g for g, _ in gaps]

    def longest_in(a: float, b: float) -> float:
        i, j = bisect.bisect_left(starts, a), bisect.bisect_right(starts, b)
        return max(sizes[i:j], default=0.0)

    longest = max(gaps, default=(0.0, 0.0))
    end = max(done, default=steady_from)
    steady_spans: list[tuple[float, float]] = []
    cursor = steady_from
    for a, b in windows:
        if a > cursor:
            steady_spans.append((cursor, min(a, end)))
        cursor = max(cursor, b)
    if end > cursor:
        steady_spans.append((cursor, end))
    steady_spans = [(a, b) for a, b in steady_spans if b > a]
    rng = random.Random(seed)

    def reference(lengths: list[float]) -> dict[str, float] | None:
        """The longest gap over stretches of steady state as long as
        ``lengths``, placed at random: median and 95th percentile over the
        draws. What the windows' longest gap would be if they were
        steady state."""
        if not lengths:
            return None
        # Where a stretch of each length fits, weighted by its room: once.
        room = []
        for length in lengths:
            fits = [(a, b) for a, b in steady_spans if b - a >= length]
            if not fits:
                return None
            room.append((length, fits, [b - a - length + 1e-9 for a, b in fits]))
        draws = []
        for _ in range(REFERENCE_DRAWS):
            worst = 0.0
            for length, fits, weights in room:
                a, b = rng.choices(fits, weights=weights)[0]
                at = rng.uniform(a, b - length)
                worst = max(worst, longest_in(at, at + length))
            draws.append(worst * 1e3)
        return {"median": statistics.median(draws), "p95": percentile(draws, 95)}

    switch_gap = max((longest_in(a, b) for a, b in switch), default=0.0) * 1e3
    startup_gap = (max(longest_in(a, b) for a, b in startup) * 1e3) if startup else None

    ka_clients = sorted({r[2] for r in records if r[2].startswith("ka")})
    new_clients = sorted({r[2] for r in records if r[2].startswith("new")})
    switch_times: dict[str, list[float]] = {
        "keepalive_all": [], "keepalive_first": [], "keepalive_all_from_first_new": [],
        "busybox": [], "new_connection": [], "new_connection_all": []}
    not_reached = 0
    for u in upgrades:
        version = int(u["version"])
        t0 = u["switched"]
        first: dict[str, float] = {}
        for r in ok:
            if _version(r[3]) >= version:
                client_first = first.get(r[2])
                if client_first is None or r[0] + r[1] < client_first:
                    first[r[2]] = r[0] + r[1]
        if not first:
            continue
        first_new = min(first.values())
        ka = [first.get(c) for c in ka_clients]
        reached = [t for t in ka if t is not None]
        if reached:
            switch_times["keepalive_first"].append(min(reached) - t0)
        if len(reached) < len(ka):
            not_reached += 1  # some keep-alive client never saw the new version
            switch_times["keepalive_all"].append(math.inf)
            switch_times["keepalive_all_from_first_new"].append(math.inf)
        elif reached:
            switch_times["keepalive_all"].append(max(reached) - t0)
            switch_times["keepalive_all_from_first_new"].append(max(reached) - first_new)
        bb = [v for k, v in first.items() if k.startswith("bb")]
        if bb:
            switch_times["busybox"].append(min(bb) - t0)
        new = [first.get(c) for c in new_clients]
        new_reached = [t for t in new if t is not None]
        if new_reached:
            switch_times["new_connection"].append(min(new_reached) - t0)
            switch_times["new_connection_all"].append(
                max(new_reached) - t0 if len(new_reached) == len(new) else math.inf)

    def finite(value: float | None) -> float | None:
        return None if value is None or math.isinf(value) else value

    criticals = [u["critical_ms"] for u in upgrades if u["critical_ms"] == u["critical_ms"]]
    return {
        "strategy": name,
        "requests": len(records),
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "upgrades": len(upgrades),
        "failures_per_upgrade": sum(failures.values()) / max(1, len(upgrades)),
        "longest_gap_ms": longest[0] * 1e3,
        "longest_gap_steady_ms": max((longest_in(a, b) for a, b in steady_spans),
                                     default=0.0) * 1e3,
        "longest_gap_switch_ms": switch_gap,
        "longest_gap_startup_ms": startup_gap,
        # The same for steady state as long as the switch windows (all of
        # them together) and the start-up windows: a maximum over 5 s is not
        # comparable with one over 20 s.
        "longest_gap_steady_like_switch_ms": reference([b - a for a, b in switch]),
        "longest_gap_steady_like_startup_ms": reference([b - a for a, b in startup]),
        "keepalive_not_reached": not_reached,
        "switch_s": {k: (finite(statistics.median(v)) if v else None)
                     for k, v in switch_times.items()},
        "switch_s_max": {k: (finite(max(v)) if v else None) for k, v in switch_times.items()},
        "latency_ms": {
            "steady": {f"p{q}": percentile(steady, q) for q in (50, 99, 99.9)},
            "window": {f"p{q}": percentile(window, q) for q in (50, 99, 99.9)},
            "switch": {f"p{q}": percentile(at_switch, q) for q in (50, 99, 99.9)},
            "startup": {f"p{q}": percentile(starting, q) for q in (50, 99, 99.9)},
        },
        "latency_samples": {"steady": len(steady), "window": len(window),
                            "switch": len(at_switch), "startup": len(starting)},
        "critical_section_ms": ({"median": statistics.median(criticals),
                                 "max": max(criticals)} if criticals else None),
        "_records": records,
        "_upgrades": upgrades,
    }


# ------------------------------------------------------------------ throughput

def _tp_server(procs: Procs, kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if kind == "hotswap":
        server, _ = procs.start("tp-hotswap", [
            PY, str(SIDECAR), "--version", "v1", "--port", str(port),
            "--name", f"tp-{uuid.uuid4().hex[:8]}"])
    else:
        server, _ = procs.start("tp-plain", [PY, str(PLAIN), "--version", "v1",
                                             "--port", str(port)])
    wait_answering(port, "v1")
    return server, port


def _wrk(wrk: str, port: int, seconds: int, close: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen([wrk, "-t1", "-c32", f"-d{seconds}s",
                             *(["-H", "Connection: close"] if close else []),
                             f"http://127.0.0.1:{port}/serve"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rps(run: subprocess.Popen[str]) -> float:
    out, _ = run.communicate(timeout=120)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"wrk said: {out}")
    return float(match.group(1))


def throughput(procs: Procs, args: argparse.Namespace) -> dict[str, Any]:
    """Requests per second of the sample sidecar with hotswap and of the same
    app without it, measured two ways, ``args.rounds`` rounds each:

    - one after the other (each server alone with its wrk, order alternating
      per round; medians): the plain throughput figure, but one round moves
      +-5% on a shared machine;
    - side by side (both servers and both wrk at the same time, the first
      started alternating per round): whatever the machine does to a round
      it does to both servers (each runs at ~78% of a core there, a
      different operating point from alone).
    """
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"skipped": "wrk is not installed (apt-get install wrk)"}
    kinds = ("hotswap", "plain")

    def alone(rounds: int, close: bool) -> dict[str, list[float]]:
        results: dict[str, list[float]] = {k: [] for k in kinds}
        for round_ in range(rounds):
            for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
                server, port = _tp_server(procs, kind)
                results[kind].append(_rps(_wrk(wrk, port, args.wrk_seconds, close)))
                procs.stop(server)
        return results

    def side_by_side(rounds: int, close: bool) -> dict[str, Any]:
        together: dict[str, list[float]] = {k: [] for k in kinds}
        for round_ in range(rounds):
            started = [(kind, *_tp_server(procs, kind))
                       for kind in (kinds if round_ % 2 == 0 else kinds[::-1])]
            runs = {kind: _wrk(wrk, port, args.wrk_seconds, close)
                    for kind, _, port in started}
            try:
                for kind, run in runs.items():
                    together[kind].append(_rps(run))
            finally:
                for run in runs.values():  # wrk stops by itself; reap it on errors too
                    if run.poll() is None:
                        run.kill()
                        run.wait()
                for _, server, _ in started:
                    procs.stop(server)
        ratios = [h / p for h, p in zip(together["hotswap"], together["plain"], strict=True)]
        return {"rounds": together, "ratios": ratios, "ratio": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios)}

    results = alone(args.rounds, False)
    med = {k: statistics.median(v) for k, v in results.items()}
    together = side_by_side(args.rounds, False)
    # A connection per request: what hotswap adds per connection (its
    # tracking for the handover) shows only here; keep-alive wrk never
    # opens one after its first 32.
    fresh = alone(max(2, args.rounds // 2), True)
    fresh_med = {k: statistics.median(v) for k, v in fresh.items()}
    return {"rounds": results, "median_rps": med, "ratio": med["hotswap"] / med["plain"],
            "side_by_side": together,
            "connection_close": {
                "rounds": fresh, "median_rps": fresh_med,
                "ratio": fresh_med["hotswap"] / fresh_med["plain"],
                "side_by_side": side_by_side(max(2, args.rounds // 2), True)}}


# ------------------------------------------------------- scaling with listeners

async def _handover_once(n: int) -> float:
    import hotswap
    name = f"scale-{uuid.uuid4().hex[:8]}"
    opts = hotswap.Options(env={})
    old = hotswap.Upgrader(name, version="old", options=opts)
    await old.start()
    for i in range(n):
        old.listen(f"l{i}", ("127.0.0.1", 0))
    await old.ready()

    async def step_aside() -> None:
        await old.wait_exit()
        await old.release()

    aside = asyncio.create_task(step_aside())
    new = hotswap.Upgrader(name, version="new", options=opts)
    t0 = time.perf_counter()
    await new.start()
    for i in range(n):
        new.listen(f"l{i}", ("127.0.0.1", 0))
    await new.ready()  # returns once the old side stopped accepting
    elapsed = time.perf_counter() - t0
    await aside
    await old.close()
    await new.close()
    return elapsed * 1e3


def listener_scaling(repeats: int) -> dict[str, Any]:
    import resource

    import uvloop
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    result = {}
    for n in (1, 10, 100, 1000):
        times = [uvloop.run(_handover_once(n)) for _ in range(repeats)]
        result[str(n)] = {"median_ms": statistics.median(times), "min_ms": min(times),
                          "max_ms": max(times)}
        say(f"handover with {n} listener(s): median {result[str(n)]['median_ms']:.2f} ms")
    return result


# --------------------------------------------- scaling with idle connections

MOVED_RE = re.compile(r"handed (\d+) connection\(s\) over in ([\d.]+) ms")


def connection_scaling(procs: Procs, counts: list[int]) -> dict[str, Any]:
    """Hand N idle keep-alive connections from v1 to v2; time the old side's
    work (pause, dup, send, close: the sum of its migration rounds) and check
    that every connection's next request is answered by v2."""
    result: dict[str, Any] = {}
    for count in counts:
        port = free_port()
        name = f"conns-{uuid.uuid4().hex[:8]}"
        argv = [PY, str(SIDECAR), "--port", str(port), "--name", name,
                "--drain-timeout", "60"]
        v1, v1_log = procs.start(f"conns-v1-{count}", [*argv, "--version", "v1"])
        wait_answering(port, "v1")
        out = procs.tmp / f"idle-{count}.json"
        clients, clients_log = procs.start(f"idle-{count}", [
            PY, str(ROOT / "bench/idle_clients.py"), "--port", str(port), "--count",
            str(count), "--out", str(out)])
        deadline = time.monotonic() + 120
        while b"ready" not in clients_log.read_bytes():
            if time.monotonic() > deadline or clients.poll() is not None:
                raise RuntimeError(f"idle clients not ready: {clients_log.read_text()}")
            time.sleep(0.05)
        v2, _ = procs.start(f"conns-v2-{count}", [*argv, "--version", "v2"])
        match = None
        while match is None:
            if time.monotonic() > deadline or v1.poll() not in (None, 0):
                raise RuntimeError(f"v1 did not hand over: {v1_log.read_text()[-2000:]}")
            match = MOVED_RE.search(v1_log.read_text())
            time.sleep(0.05)
        clients.send_signal(signal.SIGUSR1)
        clients.wait(timeout=120)
        answers = json.loads(out.read_text())
        procs.stop(v1)
        procs.stop(v2)
        result[str(count)] = {"moved": int(match.group(1)), "ms": float(match.group(2)),
                              "next_request": answers["second"]}
        say(f"handed {match.group(1)} idle connection(s) over in {match.group(2)} ms; "
            f"next requests: {answers['second']}")
    return result


def wait_settled(name: str, version: str, timeout: float = 30) -> None:
    """Until ``version`` serves ``name`` and its predecessor has drained."""
    import hotswap.control
    address = hotswap.control.control_address(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = asyncio.run(hotswap.control.query_status(address, timeout=2))
        except (OSError, hotswap.HotswapError):
            st = None
        if st and st.version == version and st.predecessor in ("none", "gone"):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{version} did not settle within {timeout}s")


def held_connections(pid: int, port: int) -> int:
    """Established TCP connections on ``port`` (the server's end) that
    process ``pid`` holds."""
    import psutil
    return sum(1 for conn in psutil.Process(pid).net_connections(kind="tcp")
               if conn.status == psutil.CONN_ESTABLISHED and conn.laddr[1:2] == (port,))


def wait_held(proc: subprocess.Popen[bytes], port: int, count: int,
              timeout: float = 30) -> None:
    """Until ``proc`` holds ``count`` established connections on ``port``."""
    deadline = time.monotonic() + timeout
    while (held := held_connections(proc.pid, port)) < count:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"pid {proc.pid} holds {held} of {count} connections on "
                               f"port {port} after {timeout}s")
        time.sleep(0.02)


def idle_keepalive(procs: Procs, clients: int = 32) -> dict[str, Any]:
    """Keep-alive clients idling 1 s between requests (longer than the 0.5 s
    drain deadline), never reconnecting unless told, never retrying; three
    upgrades, with connection handover on and off.

    Each upgrade starts once the serving version holds every client's
    connection (without handover, once every client has reconnected after
    the upgrade before: an upgrade a few tenths of a second after the one
    before found them still reconnecting, and cut nothing), and the load
    stops (its last round) once the last version holds them all, so that
    each client has met every upgrade."""
    result: dict[str, Any] = {}
    for migrate in (True, False):
        port = free_port()
        name = f"idle-{uuid.uuid4().hex[:8]}"
        argv = [PY, str(SIDECAR), "--port", str(port), "--name", name,
                "--drain-timeout", "0.5", *(() if migrate else ("--no-migrate",))]
        current, _ = procs.start("idle-v1", [*argv, "--version", "v1"])
        wait_answering(port, "v1")
        out = procs.tmp / f"idle-load-{migrate}.json"
        load, _ = procs.start("idle-load", [
            PY, str(LOADGEN), "--port", str(port), "--keepalive", str(clients),
            "--busybox", "0", "--fresh", "0", "--pace", "1.0", "--duration", "60",
            "--no-records", "--out", str(out)])
        for n in (2, 3, 4):
            wait_held(current, port, clients)  # every client's connection, idling
            new, _ = procs.start(f"idle-v{n}", [*argv, "--version", f"v{n}"])
            wait_settled(name, f"v{n}")
            procs.stop(current)
            current = new
        wait_held(current, port, clients)  # every client met the last upgrade too
        load.send_signal(signal.SIGUSR1)  # last round: one more request each
        load.wait(timeout=60)
        procs.stop(current)
        summary = json.loads(out.read_text())["summary"]
        if summary.get("died"):
            raise RuntimeError(f"idle keep-alive clients died: {summary['died']}")
        key = "on" if migrate else "off"
        result[key] = {"requests": summary["requests"], "failed": summary["failed"],
                       "failures": summary["failures"],
                       "connections": sum(summary["connections"].values())}
        say(f"idle keep-alive clients, handover {key}: {result[key]}")
    return result


# --------------------------------------------------------------------- output

def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = result["_records"]
    t0 = min(r[0] for r in records)
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=110)
    versions = sorted({r[3] for r in records if not r[3].startswith("!")},
                      key=lambda v: int(v[1:]) if v[1:].isdigit() else 0)
    colours = plt.get_cmap("tab10")
    for i, version in enumerate(versions):
        xs = [r[0] - t0 for r in records if r[3] == version]
        ys = [max(r[1] * 1e3, 0.01) for r in records if r[3] == version]
        ax.scatter(xs, ys, s=1.5, color=colours(i % 10), label=version, rasterized=True)
    failed = [r for r in records if r[3].startswith("!")]
    if failed:
        ax.scatter([r[0] - t0 for r in failed], [max(r[1] * 1e3, 0.01) for r in failed],
                   s=28, marker="x", color="red", label=f"failed ({len(failed)})", zorder=5)
    for u in result["_upgrades"]:
        ax.axvline(u["switched"] - t0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{result['strategy']}: {result['requests']} requests, "
                 f"{result['failed']} failed, {result['upgrades']} upgrades (dashed)")
    ax.legend(loc="upper right", markerscale=4, fontsize=8, ncol=len(versions) + 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Measured {report['when']} on {report['machine']}, in "
             f"{report.get('network', NETWORKS['host'])}; command: `make bench`.",
             f"Load: {report['load']}.", ""]
    lines += ["| strategy | requests | failed | failures per upgrade | by kind "
              "| longest gap, switch windows: measured / steady as long, median, p95 (ms) "
              "| longest gap, start-up: measured / steady as long, median, p95 (ms) "
              "| keep-alive all on new (s): from the switch / from the new version's first "
              "answer | new-conn all on new (s) "
              "| p50 / p99 / p99.9 steady (ms) "
              f"| p50 / p99 / p99.9 at the switch (-{WINDOW_BEFORE} to +{SHORT_AFTER} s, ms) "
              "| p50 / p99 / p99.9 switch windows (1 s, ms) "
              "| p50 / p99 / p99.9 while the new process starts (ms) "
              "| critical section (ms) |",
              "|" + "---|" * 14]

    def gap(measured: float | None, like: dict[str, float] | None) -> str:
        if measured is None:
            return "-"
        if like is None:
            return f"{fmt(measured)} / -"
        return f"{fmt(measured)} / {fmt(like['median'])}, {fmt(like['p95'])}"

    def triple(values: dict[str, float]) -> str:
        return " / ".join(fmt(values[k], 2) for k in ("p50", "p99", "p99.9"))

    for r in report["strategies"]:
        lat = r["latency_ms"]
        crit = r["critical_section_ms"]
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items())) or "-"
        times = r["switch_s"]
        missed = r.get("keepalive_not_reached", 0)
        keepalive = (f"not all, {missed} of {r['upgrades']} upgrades" if missed else
                     f"{fmt(times['keepalive_all'], 3)} / "
                     f"{fmt(times['keepalive_all_from_first_new'], 3)}")
        lines.append(
            f"| {r['strategy']} | {r['requests']} | {r['failed']} | "
            f"{fmt(r['failures_per_upgrade'])} | {kinds} | "
            f"{gap(r['longest_gap_switch_ms'], r['longest_gap_steady_like_switch_ms'])} | "
            f"{gap(r['longest_gap_startup_ms'], r['longest_gap_steady_like_startup_ms'])} | "
            f"{keepalive} | {fmt(times['new_connection_all'], 3)} | "
            f"{triple(lat['steady'])} | {triple(lat['switch'])} | {triple(lat['window'])} | "
            f"{triple(lat['startup'])} | "
            + (f"{fmt(crit['median'], 2)} (max {fmt(crit['max'], 2)})" if crit else "-")
            + " |")
    if report.get("skipped"):
        lines += ["", "Skipped (not installed): " + ", ".join(report["skipped"]) + "."]
    tp = report["throughput"]
    lines.append("")
    if "skipped" in tp:
        lines.append(f"Throughput: skipped ({tp['skipped']}).")
    else:
        side = tp["side_by_side"]
        lines.append(
            f"Steady-state throughput (wrk -t1 -c32, {len(tp['rounds']['plain'])} alternating "
            f"rounds, medians): with hotswap {tp['median_rps']['hotswap']:.0f} req/s, plain "
            f"aiohttp {tp['median_rps']['plain']:.0f} req/s, ratio {tp['ratio']:.3f}. "
            f"Side by side ({len(side['ratios'])} rounds, both servers and both wrk at "
            f"the same time): ratio median {side['ratio']:.3f} (rounds "
            f"{side['ratio_min']:.3f} to {side['ratio_max']:.3f}).")
        close = tp.get("connection_close")
        if close:
            cside = close["side_by_side"]
            lines.append(
                f"A new connection per request (wrk -H 'Connection: close', "
                f"{len(close['rounds']['plain'])} alternating rounds): with hotswap "
                f"{close['median_rps']['hotswap']:.0f} req/s, plain "
                f"{close['median_rps']['plain']:.0f} req/s, ratio {close['ratio']:.3f}; side "
                f"by side ({len(cside['ratios'])} rounds): ratio median {cside['ratio']:.3f} "
                f"(rounds {cside['ratio_min']:.3f} to {cside['ratio_max']:.3f}).")
    lines += ["", "| listeners | handover median (ms) | min | max |", "|---|---|---|---|"]
    for n, v in report["listeners"].items():
        lines.append(f"| {n} | {v['median_ms']:.2f} | {v['min_ms']:.2f} | {v['max_ms']:.2f} |")
    lines += ["", "| idle keep-alive connections | handed over | old side's time (ms) "
              "| next request on each answered by |", "|---|---|---|---|"]
    for n, v in report["connections"].items():
        answered = ", ".join(f"{k} {c}" for k, c in sorted(v["next_request"].items()))
        lines.append(f"| {n} | {v['moved']} | {v['ms']:.1f} | {answered} |")
    idle = report["idle_keepalive"]
    lines += ["", "Keep-alive clients that idle 1 s between requests (longer than the 0.5 s "
              "drain deadline), never reconnect unless told, never retry; 32 of them, 3 "
              "upgrades: "
              + "; ".join(f"connection handover {k}: {v['requests']} requests, {v['failed']} "
                          f"failed {v['failures'] or ''}, {v['connections']} connections opened"
                          for k, v in idle.items()) + "."]
    lines += ["", "Definitions: the switch is the successor's confirmation (hotswap), the "
              "reload signal (nginx, HAProxy: before their new workers exist) or the moment "
              "the old process is told to stop (naive restart, SO_REUSEPORT overlap). A switch "
              f"window runs from {WINDOW_BEFORE} s before the switch to {WINDOW_AFTER} s after "
              "it; the start-up window from the new process's launch to the switch window "
              "(hotswap: the new sidecar and its PostStart hook starting; naive restart: "
              "none, it starts after the switch, inside the switch window); steady state is "
              "every request after warm-up that overlaps no window. Latencies are of "
              "successful requests, measured by the client (connect included for new "
              "connections), placed by their start. A gap is the time between two successful "
              "responses (by their end), of any clients; \"steady as long\": the longest gap "
              f"over stretches of steady state placed at random ({REFERENCE_DRAWS} draws), as "
              "long as the switch windows (each of them) or the start-up windows, its median "
              "and 95th percentile (a longest gap grows with the time it is taken over). "
              "\"keep-alive all on new\": median over upgrades of the time until every "
              "keep-alive client has been answered by the new version, from the switch, and "
              "from the first answer of the new version to any client (the same reference "
              "for every strategy). \"new-conn all on new\": the same for the new-connection "
              "clients, from the switch. Critical section: from the successor's sending its "
              "hello to the old side's last accept."]
    return "\n".join(lines) + "\n"


class _Stop:
    # A stop is under way (or the clean-up has begun): another is not acted
    # on. SIGTERM and SIGHUP sent together (as systemd stops a session):
    # the second one's exception came out of the clean-up's first line
    # and skipped it, and the sidecar and the load generator ran on.
    stopping = False


def interrupted(signum: int, frame: object) -> None:
    """SIGTERM or SIGHUP: end like Ctrl-C, through main()'s clean-up. The
    default action ended this process alone and left the servers and the load
    generator it had started running. Once one stop is under way, another
    is left to it."""
    if _Stop.stopping:
        return
    _Stop.stopping = True
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upgrades", type=int, default=5)
    # 5 s: under this load the successor's idle-priority start-up takes ~2 s,
    # and steady state between upgrades is what the windows are compared with.
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--tail", type=float, default=2.0)
    parser.add_argument("--keepalive", type=int, default=16)
    parser.add_argument("--fresh", type=int, default=4)
    # 8: one round of 4 s moves +-5% on this shared machine; 4 rounds gave a
    # median ratio anywhere from 0.95 to 1.00 for the same code.
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--wrk-seconds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--connections", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--strategies", nargs="*",
                        default=["hotswap", "naive-restart", "reuseport-overlap",
                                 *PEERS])
    parser.add_argument("--separate-groups", action="store_true",
                        help="start each server and the load generator in a CPU "
                             "scheduling group of its own (as containers are; the hook "
                             "stays in the runner's)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (every process's log and the "
                             "load generator's raw records, ~50-150 MB) instead of "
                             "removing it after a successful run")
    parser.add_argument("--quick", action="store_true",
                        help="strategies only (no throughput or scaling runs)")
    args = parser.parse_args()
    if args.separate_groups and not autogroups_apply():
        parser.error("--separate-groups needs the kernel's autogroups "
                     "(kernel.sched_autogroup_enabled=1) and the root CPU cgroup")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    args.out.mkdir(parents=True, exist_ok=True)
    procs = Procs(Path(tempfile.mkdtemp(prefix="hotswap-bench-")), args.separate_groups)
    ok = False
    try:
        strategies = []
        skipped = []
        for name in args.strategies:
            if name in PEERS and peer_binary(name) is None:
                say(f"strategy {name}: skipped ({PEERS[name].binary} is not installed)")
                skipped.append(name)
                continue
            say(f"strategy {name}: {args.upgrades} upgrades every {args.interval}s under load")
            result = run_strategy(name, procs, args)
            plot(result, args.out / f"timeline-{name}.png")
            strategies.append(result)
            say(f"{name}: {result['requests']} requests, {result['failed']} failed "
                f"{result['failures']}")
        if args.quick:
            for result in strategies:
                print({k: v for k, v in result.items() if not k.startswith("_")})
            ok = True
            return 0
        say("throughput with and without hotswap")
        tp = throughput(procs, args)
        say("handover time against the number of listeners")
        scaling = listener_scaling(args.repeats)
        say("handing over idle keep-alive connections")
        moved = connection_scaling(procs, args.connections)
        idle = idle_keepalive(procs)
        ok = True
    finally:
        _Stop.stopping = True  # let the clean-up finish
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        procs.kill_all()
        kill_children()
        if ok and not args.keep:
            shutil.rmtree(procs.tmp, ignore_errors=True)
        else:
            say(f"logs and raw records kept in {procs.tmp}")
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Linux "
                   f"{platform.release()}, Python {platform.python_version()}",
        # scripts/own-netns.sh: in the machine's namespace, its connection
        # tracking can drop connections under this load.
        "network": NETWORKS.get(os.environ.get("HOTSWAP_NETNS", ""), NETWORKS["host"]),
        "load": (f"{args.keepalive} keep-alive clients back to back, 1 busybox client every "
                 f"100 ms, {args.fresh} new-connection clients back to back, no retries; "
                 f"{args.upgrades} upgrades {args.interval:g} s apart per strategy"
                 + ("; each process in a scheduling group of its own" if args.separate_groups
                    else "")),
        "strategies": [{k: v for k, v in r.items() if not k.startswith("_")}
                       for r in strategies],
        "skipped": skipped,
        "throughput": tp,
        "listeners": scaling,
        "connections": moved,
        "idle_keepalive": idle,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
