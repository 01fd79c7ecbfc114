"""The local hot-upgrade demo (``make demo``): the seed's scenario with real
processes on 127.0.0.1, each new side started the Kruise way.

1. slot 1 starts v1 (``SIDECARSET_VERSION=1``, ``ALT=0``: fresh) and its
   PostStart hook (``scripts/migrate.sh``) waits until it serves;
2. the busybox client calls ``/serve`` every 100 ms on one keep-alive
   connection, never retrying;
3. upgrade: slot 2 starts v2 (``VERSION=2``, ``ALT=1``), its hook waits for the
   migration; then slot 1 is reset (SIGTERM, as when Kruise switches it to the
   empty image) and must exit 0;
4. upgrade again, the other way round: slot 1 starts v3 (``VERSION=3``,
   ``ALT=2``), which takes the sockets -- and the control socket v2 inherited --
   from v2; slot 2 is reset;
5. the client stops; its log and summary are printed. Exit status 0 only if
   every hook succeeded, every old slot exited cleanly and no request failed.

Every process is started here and ended by its own pid, with deadlines, also
when the demo is interrupted (Ctrl-C, SIGTERM, SIGHUP: it kills what it
started, keeps the logs and exits non-zero; a stop that comes while a process
is being started waits until it is recorded). Each process logs to a file (the
client too: a pipe read only at the end would fill up and stall it). The
working directory (every process's log) is removed after a passing run and
kept, with its path printed, after a failing one or with ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Demo:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}  # a sidecar's pid: its log
        self.ok = True

    def env(self, version: int, alt: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(SIDECARSET_VERSION=str(version), SIDECARSET_VERSION_ALT=str(alt),
                   IS_INJECTED="true", HOTSWAP_NAME=self.args.name,
                   HOTSWAP_MIGRATE_TIMEOUT="30",
                   # The hooks' deadlines (hotswap.kruise.hook_gave_up) with
                   # the logs, not in the machine's /dev/shm.
                   HOTSWAP_HOOK_DIR=str(self.workdir),
                   HOTSWAP_CLI=f"{PY} -m hotswap",
                   PATH=f"{Path(PY).parent}:{env.get('PATH', '')}")
        return env

    def start_sidecar(self, slot: int, label: str, version: int, alt: int
                      ) -> subprocess.Popen[bytes]:
        say(f"sidecar-{slot}: start {label} (SIDECARSET_VERSION={version}, "
            f"SIDECARSET_VERSION_ALT={alt})")
        path = self.workdir / f"sidecar-{slot}-{label}.log"
        with open(path, "wb") as log, held():
            proc = subprocess.Popen(
                [PY, str(ROOT / "examples/sidecar_server/main.py"), "--version", label,
                 "--port", str(self.args.port), "--name", self.args.name],
                env=self.env(version, alt), stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(proc)
        self.logs[proc.pid] = path
        return proc

    def hook(self, slot: int, version: int, alt: int,
             sidecar: subprocess.Popen[bytes]) -> bool:
        """Run the PostStart hook as Kruise does, bounded (60 s), and ended
        with its container: a sidecar that exits (a port already taken, say)
        fails its hook at once rather than after the hook's whole timeout.
        On failure, the sidecar's log says why."""
        say(f"sidecar-{slot}: PostStart hook scripts/migrate.sh")
        deadline = time.monotonic() + 60
        stopped = ""
        hook: subprocess.Popen[str] | None = None
        try:
            with held():
                # A session of its own: ending it ends the CLI the shell waits on too.
                hook = subprocess.Popen(
                    ["sh", str(ROOT / "scripts/migrate.sh")], env=self.env(version, alt),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    start_new_session=True)
            while True:
                try:
                    out, _ = hook.communicate(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if sidecar.poll() is not None:
                    stopped = f"its sidecar exited {sidecar.returncode}"
                elif time.monotonic() > deadline:
                    stopped = "it did not exit within 60 s"
                else:
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(hook.pid, signal.SIGKILL)
                out, _ = hook.communicate()
                break
        except BaseException:  # interrupted: end the hook too
            if hook is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(hook.pid, signal.SIGKILL)
                hook.wait()
            raise
        for line in out.splitlines():
            print(f"    | {line}", flush=True)
        if stopped:
            say(f"sidecar-{slot}: hook stopped: {stopped}")
        else:
            say(f"sidecar-{slot}: hook exited {hook.returncode}")
        if stopped or hook.returncode != 0:
            self.ok = False
            with contextlib.suppress(subprocess.TimeoutExpired):  # exiting: let it log why
                sidecar.wait(timeout=2)
            log = self.logs[sidecar.pid]
            print(f"----- {log.name} -----")
            print(log.read_text(), end="", flush=True)
            if sidecar.poll() is not None:  # who holds the name, if anyone (a leftover?)
                status = subprocess.run([PY, "-m", "hotswap", "status", "--name",
                                         self.args.name], env=self.env(version, alt),
                                        capture_output=True, text=True, timeout=30)
                say(f"hotswap status --name {self.args.name}: "
                    f"{(status.stdout + status.stderr).strip()}")
            return False
        return True

    def reset(self, slot: int, proc: subprocess.Popen[bytes]) -> None:
        say(f"sidecar-{slot}: reset to the empty image (SIGTERM pid {proc.pid})")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            say(f"sidecar-{slot}: did not exit within 30s, killed")
            self.ok = False
        say(f"sidecar-{slot}: exited {code}")
        if code != 0:
            self.ok = False

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # stuck in the kernel: say so, go on
                    say(f"pid {proc.pid} did not die within 10 s of SIGKILL")


class _Stop:
    holding = False
    pending = 0  # the signal that came while holding, if any
    # A stop is under way (or the clean-up has begun): another is not acted
    # on. SIGTERM and SIGHUP sent together (as systemd stops a session):
    # the second one's exception came out of the clean-up's first line
    # and skipped it, and the sidecars and the client ran on.
    stopping = False


def stop(signum: int) -> NoReturn:
    _Stop.stopping = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt  # as Python's own handler: the exit says SIGINT
    raise SystemExit(128 + signum)


def interrupted(signum: int, frame: FrameType | None) -> None:
    """SIGTERM, SIGHUP or SIGINT: end through the clean-up below (the default
    action would kill this process alone and leave the sidecars serving, the
    port and the control socket taken) -- at once, or, inside :func:`held`,
    once the process being started is recorded. Once one stop is under
    way, another is left to it."""
    if _Stop.stopping:
        return
    if _Stop.holding:
        _Stop.pending = signum
        return
    stop(signum)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Start a process and record it as one step. A stop that came in between
    used to leave a process started but not recorded (the exception out of
    ``Popen``, after its fork, or just before the ``append``), and
    ``stop_all()`` left it running."""
    _Stop.holding = True
    try:
        yield
    finally:
        _Stop.holding = False
        if _Stop.pending:
            stop(_Stop.pending)


def main() -> int:
    parser = argparse.ArgumentParser(description="local hot-upgrade demo")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DEMO_PORT", "9091")))
    parser.add_argument("--name", default=os.environ.get("DEMO_NAME", "sidecar"))
    parser.add_argument("--dwell", type=float, default=3.0,
                        help="seconds between upgrades")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (every process's log) instead "
                             "of removing it after a passing run")
    args = parser.parse_args()

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, interrupted)
    workdir = Path(tempfile.mkdtemp(prefix="hotswap-demo-"))
    demo = Demo(args, workdir)
    passed = False
    try:
        v1 = demo.start_sidecar(1, "v1", 1, 0)
        if not demo.hook(1, 1, 0, v1):
            return 1
        summary_path = workdir / "summary.json"
        client_log = workdir / "busybox.log"
        say("busybox: calling the sidecar every 100 ms")
        with open(client_log, "wb") as out, held():
            client = subprocess.Popen(
                [PY, str(ROOT / "examples/busybox_client/main.py"),
                 "--url", f"http://127.0.0.1:{args.port}/serve", "--interval", "0.1",
                 "--summary-json", str(summary_path)],
                stdout=out, stderr=subprocess.STDOUT)
            demo.procs.append(client)
        time.sleep(args.dwell)

        say("=== upgrade 1: v1 -> v2 (sidecar-2 leaves the empty image) ===")
        v2 = demo.start_sidecar(2, "v2", 2, 1)
        if demo.hook(2, 2, 1, v2):
            demo.reset(1, v1)
        time.sleep(args.dwell)

        say("=== upgrade 2: v2 -> v3 (sidecar-1 leaves the empty image) ===")
        v3 = demo.start_sidecar(1, "v3", 3, 2)
        if demo.hook(1, 3, 2, v3):
            demo.reset(2, v2)
        time.sleep(args.dwell)

        say("busybox: stopping")
        client.send_signal(signal.SIGTERM)
        client.wait(timeout=30)
        print("----- busybox log -----")
        print(client_log.read_text(), end="")
        print("-----------------------")
        summary = json.loads(summary_path.read_text())
        demo.reset(1, v3)
        for log in sorted(workdir.glob("sidecar-*.log")):
            print(f"----- {log.name} -----")
            print(log.read_text(), end="")
        order = summary["version_order"]
        print(f"RESULT: {summary['requests']} requests, {summary['failed']} failed, "
              f"versions in order: {' -> '.join(order)}, "
              f"{summary['connections']} connection(s) opened")
        if order != ["v1", "v2", "v3"]:
            say("expected the client to see v1, then v2, then v3")
            demo.ok = False
        if summary["connections"] != 1:
            # Its keep-alive connection moves from version to version.
            say(f"expected the client to keep one connection throughout; it opened "
                f"{summary['connections']}")
            demo.ok = False
        if summary["failed"] or client.returncode != 0:
            demo.ok = False
        say("PASS" if demo.ok else "FAIL")
        passed = demo.ok
        return 0 if demo.ok else 1
    finally:
        _Stop.stopping = True  # let the clean-up finish
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        demo.stop_all()
        if passed and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"logs kept in {workdir}")


if __name__ == "__main__":
    sys.exit(main())
