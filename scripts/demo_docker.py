"""The container demo (``make demo-docker``): a Kruise pod emulated with
docker compose, its HotUpgrade sidecar upgraded v1 -> v2 -> v3 the way Kruise
does it, while the busybox container calls the sidecar every 100 ms.

For each upgrade, as the SidecarSet controller and the kubelet would:

1. *Upgrade*: the idle slot (on the empty image) is switched to the new image
   with ``SIDECARSET_VERSION=<new>``, ``SIDECARSET_VERSION_ALT=<old>``;
2. *Migration*: its PostStart hook (``/usr/local/bin/migrate.sh``) runs in it,
   and the driver waits for its exit code (0 = migrated);
3. *Reset*: the old slot is stopped (SIGTERM; it must exit 0) and switched to
   the empty image with ``SIDECARSET_VERSION=0``; its hook and probe, which
   have no Python there, must exit 0 at once.

The versions are the SidecarSet's resourceVersions, as Kruise sets them
(ten digits), not 1, 2, 3.

With ``--failed-migration`` an upgrade to a v2 that takes the sockets and never
confirms is tried first: its hook must fail while v1 serves on; the slot is put
back on the empty image.

It prints the busybox log around each switch, the image sizes and a summary,
and exits 0 only if every hook and check passed and no request failed. Every
container is removed at the end (``docker compose down``), also when the demo
is stopped (Ctrl-C, SIGTERM, SIGHUP: it exits non-zero).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
TAG = "dev"
# SIDECARSET_VERSION of v1, v2, v3: resourceVersions, as Kruise sets them.
RV = {"v1": "1097936677", "v2": "1098297016", "v3": "1098301234"}
EMPTY = f"hotswap-empty:{TAG}"
BUSYBOX = f"hotswap-busybox:{TAG}"


def sidecar_image(version: str) -> str:
    return f"hotswap-sidecar:{version}"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def say(message: str) -> None:
    print(f"[demo-docker {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(argv: list[str], *, env: dict[str, str] | None = None, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                            cwd=ROOT)
    if check and result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(argv)}\n"
                         f"{result.stdout}{result.stderr}")
    return result


def build_images(base: str | None) -> None:
    base_args = ["--build-arg", f"BASE_IMAGE={base}"] if base else []
    jobs = [(sidecar_image(v), "Dockerfile.sidecar", ["--build-arg", f"VERSION={v}"])
            for v in ("v1", "v2", "v3")]
    jobs += [(EMPTY, "Dockerfile.empty", []), (BUSYBOX, "Dockerfile.busybox", [])]
    for tag, dockerfile, extra in jobs:
        say(f"building {tag} ({dockerfile}{', base ' + base if base else ''})")
        run(["docker", "build", "-q", "-f", dockerfile, *base_args, *extra, "-t", tag, "."],
            timeout=1800)


class Pod:
    """The compose project, and what each slot runs."""

    def __init__(self, project: str, handover_timeout: str) -> None:
        self.project = project
        self.slots = {1: {"image": sidecar_image("v1"), "version": RV["v1"], "alt": "0",
                          "fail": ""},
                      2: {"image": EMPTY, "version": "0", "alt": RV["v1"], "fail": ""}}
        self.handover_timeout = handover_timeout
        self.ok = True
        self.hook_output = ""

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for slot, spec in self.slots.items():
            env[f"SIDECAR{slot}_IMAGE"] = spec["image"]
            env[f"SIDECAR{slot}_VERSION"] = spec["version"]
            env[f"SIDECAR{slot}_ALT"] = spec["alt"]
            env[f"SIDECAR{slot}_FAIL"] = spec["fail"]
        env.update(EMPTY_IMAGE=EMPTY, BUSYBOX_IMAGE=BUSYBOX,
                   HANDOVER_TIMEOUT=self.handover_timeout)
        return env

    def compose(self, *args: str, check: bool = True,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(["docker", "compose", "-f", "compose.yaml", "-p", self.project, *args],
                   env=self.env(), check=check, timeout=timeout)

    def container(self, service: str) -> str:
        return self.compose("ps", "-a", "-q", service).stdout.strip()

    def inspect(self, service: str) -> dict[str, object]:
        data = json.loads(run(["docker", "inspect", self.container(service)]).stdout)[0]
        assert isinstance(data, dict)
        return data

    def switch(self, slot: int, image: str, version: str, alt: str, fail: str = "") -> None:
        self.slots[slot] = {"image": image, "version": version, "alt": alt, "fail": fail}
        say(f"sidecar-{slot}: image {image}, SIDECARSET_VERSION={version}, "
            f"SIDECARSET_VERSION_ALT={alt}{' (' + fail + ' before confirming)' if fail else ''}")
        self.compose("up", "-d", "--no-deps", f"sidecar-{slot}")

    def hook(self, slot: int, *, timeout: str = "60") -> int:
        say(f"sidecar-{slot}: PostStart hook /usr/local/bin/migrate.sh")
        # docker exec, not compose exec: some Compose v2 builds drop the exit code.
        result = run(["docker", "exec", "-e", f"HOTSWAP_MIGRATE_TIMEOUT={timeout}",
                      self.container(f"sidecar-{slot}"), "sh", "/usr/local/bin/migrate.sh"],
                     check=False, timeout=120)
        self.hook_output = result.stdout + result.stderr
        for line in self.hook_output.splitlines():
            print(f"    | {line}", flush=True)
        say(f"sidecar-{slot}: hook exited {result.returncode}")
        return result.returncode

    def probe(self, slot: int, *, python: bool = True) -> int:
        """The readiness probe in a slot. ``python=False`` takes the CLI
        fallback away (``HOTSWAP_CLI=false``): 0 then means probe.sh answered
        from the serving marker in /proc/net/unix alone."""
        env = [] if python else ["-e", "HOTSWAP_CLI=false"]
        return run(["docker", "exec", *env, self.container(f"sidecar-{slot}"), "sh",
                    "/usr/local/bin/probe.sh"], check=False, timeout=60).returncode

    def reset(self, slot: int, other_version: str) -> None:
        """Stop the old slot and put the empty image in it, with version 0
        (Kruise's flipPodSidecarContainerDo)."""
        say(f"sidecar-{slot}: reset (stop, then the empty image)")
        restarts = self.inspect(f"sidecar-{slot}")["RestartCount"]
        self.check(restarts == 0, f"sidecar-{slot} idled after its drain, never restarted")
        self.compose("stop", f"sidecar-{slot}", timeout=60)
        state = self.inspect(f"sidecar-{slot}")["State"]
        assert isinstance(state, dict)
        say(f"sidecar-{slot}: old version exited {state['ExitCode']}")
        self.check(state["ExitCode"] == 0, f"sidecar-{slot} exited 0 after its drain")
        self.switch(slot, EMPTY, "0", other_version)
        self.check(self.hook(slot) == 0, f"sidecar-{slot}: the empty image's hook exits 0")
        self.check(self.probe(slot) == 0, f"sidecar-{slot}: the empty image's probe says ready")
        image = self.inspect(f"sidecar-{slot}")["Config"]
        assert isinstance(image, dict)
        self.check(image["Image"] == EMPTY, f"sidecar-{slot} is on the empty image")

    def logs(self, slot: int) -> str:
        result = run(["docker", "logs", self.container(f"sidecar-{slot}")], check=False)
        return result.stdout + result.stderr

    def serving(self, slot: int) -> dict[str, object]:
        result = run(["docker", "exec", self.container(f"sidecar-{slot}"), "hotswap",
                      "status", "--name", "sidecar", "--json"], check=False)
        return json.loads(result.stdout) if result.returncode == 0 else {}

    def check(self, condition: bool, what: str) -> None:
        say(f"{'ok  ' if condition else 'FAIL'} {what}")
        if not condition:
            self.ok = False


def busybox_log(pod: Pod) -> list[tuple[dt.datetime, str]]:
    out = run(["docker", "logs", "--timestamps", pod.container("busybox")]).stdout
    lines = []
    for line in out.splitlines():
        stamp, _, text = line.partition(" ")
        try:
            when = dt.datetime.fromisoformat(stamp[:26] + "+00:00")
        except ValueError:
            continue
        lines.append((when, text))
    return lines


def wait_for_first_response(pod: Pod, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("success" in text for _, text in busybox_log(pod)):
            return
        time.sleep(0.2)
    raise SystemExit("busybox got no response within 60 s")


class _Stop:
    # A stop is under way (or the clean-up has begun): another is not acted
    # on. SIGTERM and SIGHUP sent together (as systemd stops a session):
    # the second one's exception came out of the clean-up's first line
    # and skipped it, and the pod's containers ran on.
    stopping = False


def interrupted(signum: int, frame: FrameType | None) -> None:
    """SIGTERM or SIGHUP: end like Ctrl-C, through ``compose down`` (the
    default action ended this process alone and left the pod's containers
    running; a ``docker compose`` under way is killed by ``run()``). Once
    one stop is under way, another is left to it."""
    if _Stop.stopping:
        return
    _Stop.stopping = True
    raise SystemExit(128 + signum)


def main() -> int:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default="hotswap-demo")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--failed-migration", action="store_true",
                        help="first try a v2 that never confirms (its hook must fail)")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--dwell", type=float, default=3.0)
    args = parser.parse_args()
    if run(["docker", "info"], check=False, timeout=60).returncode != 0:
        raise SystemExit("demo-docker: no Docker engine answers `docker info`; start one "
                         "(on a machine without Docker Hub: ../shared/tools/docker-up.sh, "
                         "then BASE_IMAGE=<the tag it prints>)")
    base = os.environ.get("BASE_IMAGE") or None
    if not args.skip_build:
        build_images(base)
    if args.build_only:
        return 0
    pod = Pod(args.project, "5" if args.failed_migration else "30")
    switches: list[tuple[str, dt.datetime]] = []
    pod.compose("down", "--remove-orphans", "--timeout", "5", check=False)
    try:
        say("starting the pod: sandbox, sidecar-1 = v1, sidecar-2 = empty")
        pod.compose("up", "-d", "pod", "sidecar-1", "sidecar-2")
        pod.check(pod.hook(1) == 0, "sidecar-1 (v1) started")
        pod.check(pod.hook(2) == 0, "sidecar-2 (empty) hook exits 0")
        pod.compose("up", "-d", "--no-deps", "busybox")
        wait_for_first_response(pod)
        time.sleep(args.dwell)

        if args.failed_migration:
            say("=== failed migration: a v2 that takes the sockets and never confirms ===")
            switches.append(("failed v2", now()))
            pod.switch(2, sidecar_image("v2"), RV["v2"], RV["v1"], fail="hang")
            pod.check(pod.hook(2, timeout="8") != 0, "the failed migration's hook exits non-zero")
            status = pod.serving(1)
            pod.check(status.get("version") == "v1" and status.get("state") == "serving",
                      f"v1 still serves: {status}")
            say("sidecar-2: back to the empty image")
            pod.switch(2, EMPTY, "0", RV["v1"])
            time.sleep(args.dwell)

        say("=== upgrade 1: v1 -> v2 (sidecar-2) ===")
        switches.append(("v1 -> v2", now()))
        pod.switch(2, sidecar_image("v2"), RV["v2"], RV["v1"])
        pod.check(pod.hook(2) == 0, "migration to v2")
        pod.check(f"migration to version {RV['v2']} done (version {RV['v2']} serves)"
                  in pod.hook_output, "the hook saw v2 serve from its serving marker (no Python)")
        # As uid 10001 under the engine's default seccomp profile: SCHED_IDLE
        # for the successor's imports must be allowed, not silently skipped.
        pod.check("loaded at idle CPU priority" in pod.logs(2),
                  "v2 loaded its modules at idle CPU priority")
        pod.check(pod.probe(2, python=False) == 0 and pod.probe(1, python=False) == 0,
                  "readiness without Python: v2 serving, v1 superseded (serving marker)")
        pod.check(pod.probe(2) == 0 and pod.probe(1) == 0, "readiness probes pass")
        pod.reset(1, RV["v2"])
        time.sleep(args.dwell)

        say("=== upgrade 2: v2 -> v3 (sidecar-1) ===")
        switches.append(("v2 -> v3", now()))
        pod.switch(1, sidecar_image("v3"), RV["v3"], RV["v2"])
        pod.check(pod.hook(1) == 0, "migration to v3")
        pod.reset(2, RV["v3"])
        time.sleep(args.dwell)

        say("stopping busybox")
        pod.compose("stop", "busybox", timeout=60)
        log = busybox_log(pod)
        for label, when in switches:
            print(f"----- busybox around {label} ({when:%H:%M:%S.%f}) -----")
            for stamp, text in log:
                if -0.4 <= (stamp - when).total_seconds() <= 2.5:
                    print(f"{stamp:%H:%M:%S.%f} {text}")
        summary = [text for _, text in log if text.startswith("summary:")]
        print("----- busybox summary -----")
        print(summary[-1] if summary else "(no summary)")
        state = pod.inspect("busybox")["State"]
        assert isinstance(state, dict)
        failed = sum("request sidecar server failed" in text for _, text in log)
        total = sum(text.startswith("request sidecar server") for _, text in log)
        pod.check(bool(summary) and " 0 failed" in summary[-1] and failed == 0,
                  f"busybox: {total} requests, {failed} failed")
        pod.check(state["ExitCode"] == 0, "busybox exited 0 (it exits 1 on any failure)")
        pod.check(bool(summary) and "v1 -> v2 -> v3" in summary[-1],
                  "busybox saw v1, then v2, then v3")
        for service in ("pod", "sidecar-1", "sidecar-2"):
            info = pod.inspect(service)
            pod.check(info["RestartCount"] == 0, f"{service} never restarted")
        print("----- images -----")
        for image in (*(sidecar_image(v) for v in ("v1", "v2", "v3")), EMPTY, BUSYBOX):
            size = int(run(["docker", "image", "inspect", "-f", "{{.Size}}", image]).stdout)
            print(f"{image:28} {size / 1e6:8.1f} MB")
        say("PASS" if pod.ok else "FAIL")
        return 0 if pod.ok else 1
    finally:
        _Stop.stopping = True  # let the clean-up finish
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        pod.compose("down", "--remove-orphans", "--timeout", "5", check=False)


if __name__ == "__main__":
    sys.exit(main())
