"""Handover behaviour with real processes on 127.0.0.1 (issue 2's list).

Each test starts its own sidecars (the sample aiohttp+uvloop server, or the
tiny generic-API server) under a unique name, and a separate load-generator
process whose clients never retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from conftest import (
    Load,
    Procs,
    child_env,
    frozen,
    port_of,
    read_response,
    serving,
    status,
    wait_for,
)

import hotswap
import hotswap.control
import hotswap.upgrader


def test_v1_v2_v3_under_load_loses_nothing(
        procs: Procs, name: str, load: Callable[..., Load]) -> None:
    """Invariants 1, 5, 8: v1 -> v2 -> v3 under keep-alive and new-connection
    load; the control socket inherited by v2 is handed on to v3."""
    v1 = procs.sidecar(name, "v1")
    st = wait_for(serving(name, "v1"), 15, "v1 serving")
    port = port_of(st)
    traffic = load(port, keepalive=4, fresh=2)
    v2 = procs.sidecar(name, "v2")
    wait_for(serving(name, "v2"), 15, "v2 serving, v1 drained")
    assert v1.wait(timeout=15) == 0, "v1 exits 0 after draining"
    v3 = procs.sidecar(name, "v3")
    st3 = wait_for(serving(name, "v3"), 15, "v3 serving, v2 drained")
    assert v2.wait(timeout=15) == 0
    assert port_of(st3) == port and st3.generation == 2
    result = traffic.finish()
    assert result["failed"] == 0, result
    assert set(result["versions"]) == {"v1", "v2", "v3"}, result
    # Every keep-alive client (and the busybox one) moved forward and never
    # back. A new-connection client may go back once, and only by one: the
    # successor accepts before it confirms, and the old side until it has
    # read the confirmation, so for a moment both take new connections
    # (v1, v2, v1, v2 was seen); never v1 after v3.
    for client, order in result["orders"].items():
        if not client.startswith("new"):
            assert order == sorted(order), (client, order)
        newest = order[0]
        for version in order:
            newest = max(newest, version)
            assert int(version[1:]) >= int(newest[1:]) - 1, (client, order)
    assert result["requests"] > 500, result
    v3.send_signal(signal.SIGTERM)
    assert v3.wait(timeout=15) == 0
    # Lossless, so nothing for an operator alerting on WARNING: no such
    # line in any of the three processes' logs, read whole.
    for label, _, path in procs.procs:
        alarms = [line for line in path.read_text(errors="replace").splitlines()
                  if " WARNING " in line or " ERROR " in line or "Traceback" in line]
        assert not alarms, (label, alarms)


def test_an_upgrade_while_the_last_one_still_drains_logs_no_warning(
        procs: Procs, name: str) -> None:
    """v3 comes while v2's predecessor (v1) still drains a 3 s request: v2
    refuses it as busy and v3 retries until v1 is gone. Normal and lossless,
    so no WARNING (one a retry, dozens an upgrade, paged the operators),
    and each side says so once, not once a retry. v1 stops itself as it
    drains (just after its Released) until v3 has been refused: else the
    3 s could run out before v2 and v3 had started (on a loaded machine),
    v3 came to a settled v2, and no side had anything to say."""
    v1 = procs.faulty(name, "v1", "send:released:stop-after", args=("--delay", "3"))
    st = wait_for(serving(name, "v1"), 15, "v1 serving")
    port, baseline = port_of(st), st.num_fds
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(b"GET /serve HTTP/1.1\r\nHost: x\r\n\r\n")  # 3 s in v1
    wait_for(lambda: (s := status(name)) is not None and s.num_fds > baseline, 10,
             "v1 to accept the connection")
    v2 = procs.sidecar(name, "v2")
    wait_for(lambda: frozen(v1.pid), 15, "v1 stopped as it drains")
    wait_for(serving(name, "v2", settled=False), 15, "v2 serving, v1 draining")
    v3 = procs.sidecar(name, "v3")
    v3_log = procs.procs[-1][2]
    wait_for(lambda: "serving process busy" in v3_log.read_text(errors="replace"), 30,
             "v3 refused as busy")
    os.kill(v1.pid, signal.SIGCONT)
    wait_for(serving(name, "v3"), 30, "v3 serving, v2 drained")
    assert b"version(v1)" in read_response(sock)
    sock.close()
    assert v1.wait(timeout=15) == 0 and v2.wait(timeout=15) == 0
    v3.send_signal(signal.SIGTERM)
    assert v3.wait(timeout=15) == 0
    logs = {label: path.read_text(errors="replace") for label, _, path in procs.procs}
    for label, log in logs.items():
        alarms = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
        assert not alarms, (label, alarms)
    assert logs["v2"].count("must wait (busy: previous generation still draining)") == 1, \
        logs["v2"]
    assert logs["v3"].count("serving process busy") == 1, logs["v3"]


def test_successor_killed_before_confirming(
        procs: Procs, name: str, load: Callable[..., Load]) -> None:
    """Invariant 3: a successor SIGKILLed after receiving the descriptors and
    before confirming changes nothing; the next upgrade still works."""
    v1 = procs.sidecar(name, "v1")
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    traffic = load(port, keepalive=3, fresh=2)
    bad = procs.sidecar(name, "v2", args=("--fail-start", "kill"))
    assert bad.wait(timeout=15) == -signal.SIGKILL
    st = wait_for(serving(name, "v1"), 15, "v1 serving again")
    assert st.pid == v1.pid and v1.poll() is None
    v2 = procs.sidecar(name, "v2")
    wait_for(serving(name, "v2"), 15, "v2 serving after the failed try")
    assert v1.wait(timeout=15) == 0
    result = traffic.finish()
    assert result["failed"] == 0, result
    assert set(result["versions"]) == {"v1", "v2"}
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0


def test_older_version_never_takes_the_sockets_back(procs: Procs, name: str) -> None:
    """Invariant 4: a restarted old slot (VERSION < ALT) stays passive, and a
    successor whose version is not higher is refused by the serving one."""
    v1 = procs.sidecar(name, "v1", SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    v3 = procs.sidecar(name, "v3", SIDECARSET_VERSION="3", SIDECARSET_VERSION_ALT="1")
    wait_for(serving(name, "v3"), 15, "v3 serving")
    # v1's slot restarted mid-upgrade: it must stay passive.
    old = procs.sidecar(name, "v1", SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="3")
    # Not taking over, version 2 asks: refused as older than 3.
    older = procs.sidecar(name, "v2", SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1")
    assert older.wait(timeout=15) != 0
    assert "refused (older)" in procs.logs()
    st = status(name)
    assert st is not None and st.version == "v3" and st.pid == v3.pid
    wait_for(lambda: "not serving" in procs.logs(), 15, "the restarted old slot passive")
    assert old.poll() is None, "passive slot idles until SIGTERM"
    old.send_signal(signal.SIGTERM)
    assert old.wait(timeout=10) == 0
    for proc in (v1, v3):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_a_restarted_old_slot_stands_in_while_nobody_serves(
        procs: Procs, name: str, load: Callable[..., Load]) -> None:
    """Invariants 1 and 4, the way a pod gets there: v2 is SIGKILLed before
    confirming (a bad image), then v1's slot crashes too and the kubelet
    restarts it with Kruise's env, ``VERSION=1 ALT=2``. Nobody serves, so it
    binds and serves (it stayed passive: the pod had no acceptor until v2
    came back), and v2, restarted, takes over from it under load with 0
    failed requests; it then idles until its SIGTERM, as a Kruise slot."""
    v1 = procs.sidecar(name, "v1", SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    bad = procs.sidecar(name, "v2", args=("--fail-start", "kill"),
                        SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1")
    assert bad.wait(timeout=15) == -signal.SIGKILL
    v1.kill()
    assert v1.wait(timeout=10) == -signal.SIGKILL
    again = procs.sidecar(name, "v1", SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="2")
    st = wait_for(serving(name, "v1"), 15, "the restarted old slot standing in")
    assert st.pid == again.pid
    traffic = load(port_of(st), keepalive=3, fresh=2)
    v2 = procs.sidecar(name, "v2", SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1")
    wait_for(serving(name, "v2"), 15, "v2 serving, taken over from the stand-in")
    result = traffic.finish()
    assert result["failed"] == 0, result
    assert set(result["versions"]) == {"v1", "v2"}, result
    assert "nobody serves" in procs.logs()
    wait_for(lambda: "idle without sockets" in procs.logs(), 15, "the stand-in drained")
    assert again.poll() is None, "a Kruise slot idles until SIGTERM"
    for proc in (again, v2):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def _as_uid(uid: int, probe: Callable[[], Coroutine[Any, Any, str]]) -> str:
    """Run ``probe`` in a forked child that has dropped to ``uid`` (and gid
    ``uid - 1``: a real peer with other credentials, whose uid and gid
    differ so that SO_PEERCRED's fields cannot be mixed up; forking avoids
    exec'ing an interpreter that uid may not be allowed to read). Returns
    what the probe returned."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid - 1)  # not the uid: a check that read the gid fails
            os.setuid(uid)
            result = asyncio.run(probe())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result, code = f"error {type(exc).__name__}: {exc}", 1
        os.write(write_end, result.encode())
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        out = fh.read().decode()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) in (0, 1), out
    return out


def test_peer_with_another_uid_is_refused(procs: Procs, name: str) -> None:
    """Invariant 6: SO_PEERCRED uid check on the (permission-less) abstract
    control socket, for a status query and for a takeover; service continues."""
    if os.getuid() != 0:
        pytest.skip("needs root to drop to another uid for the peer")
    v1 = procs.sidecar(name, "v1")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    address = hotswap.control.control_address(name)

    # The peers trust the root server (allowed_uids): the refusal checked
    # is the server's, not their own check of the server's uid.
    async def ask_status() -> str:
        try:
            await hotswap.control.query_status(address, timeout=5, allowed_uids={0})
        except hotswap.HandoverRefused as exc:
            return f"refused {exc.code}: {exc.reason}"
        return "answered"

    async def take_over() -> str:
        upgrader = hotswap.Upgrader(name, version="v2", options=hotswap.Options(
            env={}, allowed_uids=frozenset({0})))
        try:
            await upgrader.start()
        except hotswap.HandoverRefused as exc:
            return f"refused {exc.code}: {exc.reason}"
        finally:
            await upgrader.close()
        return "took over"

    async def ask_status_blocking() -> str:  # the CLI's client, no event loop
        try:
            hotswap.control.status_blocking(address, timeout=5, allowed_uids={0})
        except hotswap.HandoverRefused as exc:
            return f"refused {exc.code}: {exc.reason}"
        return "answered"

    server_says = "refused forbidden: uid 65534 is not allowed"
    assert _as_uid(65534, ask_status) == server_says
    assert _as_uid(65534, ask_status_blocking) == server_says
    assert _as_uid(65534, take_over) == server_says
    st = status(name)
    assert st is not None and st.pid == v1.pid and st.state == "serving"
    assert "refused control peer" in procs.logs()
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_a_flood_of_peers_of_another_uid_does_not_flood_the_log(procs: Procs,
                                                                name: str) -> None:
    """Any process of the pod's network namespace can connect to the abstract
    control socket, whatever its uid: each refusal was a warning line of its
    own, so an unprivileged peer connecting in a loop wrote the sidecar's log
    as fast as it could connect (2,000 lines in 0.3 s), drowning the rest.
    The first refusal is logged at once, then at most one line per 10 s with
    the count; each peer is still refused, and the service goes on."""
    if os.getuid() != 0:
        pytest.skip("needs root to drop to another uid for the peer")
    v1 = procs.sidecar(name, "v1")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    address = hotswap.control.control_address(name)
    peers = 300

    async def flood() -> str:
        answers: set[str] = set()
        for _ in range(peers):
            try:
                hotswap.control.status_blocking(address, timeout=5, allowed_uids={0})
            except hotswap.HandoverRefused as exc:
                answers.add(f"refused {exc.code}")
            else:
                answers.add("answered")
        return ",".join(sorted(answers))

    assert _as_uid(65534, flood) == "refused forbidden"
    st = status(name)
    assert st is not None and st.pid == v1.pid and st.state == "serving"
    v1.send_signal(signal.SIGTERM)  # the count not yet logged is logged as it stops
    assert v1.wait(timeout=15) == 0
    log = procs.procs[0][2].read_text(errors="replace")  # v1's, whole
    lines = [line for line in log.splitlines() if "refused control peer" in line]
    assert 1 <= len(lines) <= 3, lines
    counted = [int(m[1]) if (m := re.search(r"(\d+) refused in all", line)) else 1
               for line in lines]
    assert sum(counted) == peers, lines


def test_allow_uids_on_both_sides(procs: Procs, name: str) -> None:
    """Invariant 6 with a hook and a probe that run as another user: the
    server allows their uid by the same HOTSWAP_ALLOW_UIDS the CLI reads, so
    setting it on both sides is enough; the clients then believe the server
    (root) by their own HOTSWAP_ALLOW_UIDS."""
    if os.getuid() != 0:
        pytest.skip("needs root to drop to another uid for the peer")
    from hotswap import cli

    v1 = procs.sidecar(name, "v1", HOTSWAP_ALLOW_UIDS="65534")
    wait_for(serving(name, "v1"), 15, "v1 serving")

    async def cli_status() -> str:
        os.environ["HOTSWAP_ALLOW_UIDS"] = "0"
        return f"exit {cli.main(['status', '--name', name])}"

    assert _as_uid(65534, cli_status) == "exit 0"
    assert "refused control peer" not in procs.logs()
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_the_low_level_program_taken_over_in_a_kruise_slot_waits_for_sigterm(
        procs: Procs, name: str) -> None:
    """The README's five-call program (tests/support/tiny_server.py) taken
    over in a Kruise slot: its container must not exit before Kruise resets
    the slot with SIGTERM (an exit would be a restart under the kubelet).
    It exited as soon as it had drained; it now waits for the SIGTERM."""
    v1 = procs.tiny(name, "v1", SIDECARSET_VERSION="1", SIDECARSET_VERSION_ALT="0")
    wait_for(serving(name, "v1"), 15, "v1 serving")
    procs.tiny(name, "v2", SIDECARSET_VERSION="2", SIDECARSET_VERSION_ALT="1")
    wait_for(serving(name, "v2"), 15, "v2 serving, v1 drained")
    with pytest.raises(subprocess.TimeoutExpired):  # it drained, and stays
        v1.wait(timeout=1)
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=15) == 0


def test_descriptors_stable_over_100_handovers(procs: Procs, name: str) -> None:
    """Invariant 7: no descriptor leaks generation after generation, and no
    process left behind."""
    generations = 100
    previous = procs.tiny(name, "g0")
    st = wait_for(serving(name, "g0"), 15, "g0 serving")
    port = port_of(st)
    # num_fds is read by the server itself (psutil) while it answers the
    # status query: its own descriptors plus that one connection. Every
    # generation, once done with its predecessor, holds what a fresh start
    # holds: a leak per takeover shows in the first successor already.
    counts = [st.num_fds]
    for gen in range(1, generations + 1):
        current = procs.tiny(name, f"g{gen}")
        st = wait_for(serving(name, f"g{gen}"), 15, f"g{gen} serving")
        assert previous.wait(timeout=15) == 0
        assert port_of(st) == port and st.generation == gen
        st = wait_for(lambda: (s := status(name)) is not None and s.predecessor == "gone"
                      and s, 15, f"g{gen} done with its predecessor")
        counts.append(st.num_fds)
        previous = current
    assert max(counts) == min(counts), counts
    alive = [p.pid for _, p, _ in procs.procs if p.poll() is None]
    assert alive == [previous.pid]
    previous.send_signal(signal.SIGTERM)
    assert previous.wait(timeout=15) == 0


def test_successor_hung_past_the_deadline(
        procs: Procs, name: str, load: Callable[..., Load]) -> None:
    """Invariant 3: a successor that takes the descriptors and never confirms
    is given up on at handover_timeout; the old one serves on, and the hung
    one aborts cleanly on SIGTERM."""
    v1 = procs.sidecar(name, "v1", args=("--handover-timeout", "1"))
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    traffic = load(port, keepalive=3, fresh=2)
    hung = procs.sidecar(name, "v2", args=("--fail-start", "hang"))
    wait_for(lambda: "still serving" in procs.logs(), 15, "v1 to give up on the hung v2")
    st = status(name)
    assert st is not None and st.pid == v1.pid and st.state == "serving"
    hung.send_signal(signal.SIGTERM)
    assert hung.wait(timeout=15) == 0
    v2 = procs.sidecar(name, "v2")
    wait_for(serving(name, "v2"), 15, "v2 serving after the hung try")
    assert v1.wait(timeout=15) == 0
    result = traffic.finish()
    assert result["failed"] == 0, result
    v2.send_signal(signal.SIGTERM)
    assert v2.wait(timeout=15) == 0


@contextlib.contextmanager
def _served_as(uid: int, name: str) -> Iterator[Callable[[], bool]]:
    """A server of ``name`` running as ``uid`` (gid ``uid - 1``, as
    :func:`_as_uid`) in a forked child (it would hand its sockets to root
    too: allowed uids 0 and ``uid``), until the
    block ends; taken over, it releases its sockets. Yields ``stop()``: ends
    the server and says whether it was still serving (not taken over) when
    it stopped."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: serve as uid until stop_r closes
        code = 1
        try:
            os.close(ready_r)
            os.close(stop_w)
            os.setgroups([])
            os.setgid(uid - 1)  # not the uid: a check that read the gid fails
            os.setuid(uid)

            async def serve() -> hotswap.State:
                upg = hotswap.Upgrader(name, version="v1", options=hotswap.Options(
                    env={}, allowed_uids=frozenset({0, uid})))
                await upg.start()
                upg.listen("http", ("127.0.0.1", 0))
                await upg.ready()

                async def release_when_taken_over() -> None:
                    if await upg.wait_exit() is hotswap.ExitReason.TAKEN_OVER:
                        await upg.release()

                releasing = asyncio.create_task(release_when_taken_over())
                os.write(ready_w, b"ready")
                # (Nothing here may import: the stdlib may be unreadable as uid.)
                loop = asyncio.get_running_loop()
                stopped = loop.create_future()
                loop.add_reader(stop_r, stopped.set_result, None)
                await stopped
                releasing.cancel()
                state = upg.state
                await upg.close()
                return state

            code = 0 if asyncio.run(serve()) is hotswap.State.SERVING else 2
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(stop_r)
    reaped = False

    def stop() -> bool:
        nonlocal stop_w, reaped
        os.close(stop_w)
        stop_w = -1
        deadline = time.monotonic() + 15
        wait_status = -1
        while not reaped and time.monotonic() < deadline:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            reaped = done == pid
            time.sleep(0 if reaped else 0.05)
        return reaped and os.waitstatus_to_exitcode(wait_status) == 0

    try:
        assert select.select([ready_r], [], [], 15)[0], f"the uid-{uid} server did not start"
        assert os.read(ready_r, 5) == b"ready"
        yield stop
    finally:
        os.close(ready_r)
        if stop_w >= 0:
            os.close(stop_w)
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_server_of_another_uid_is_not_taken_from(procs: Procs, name: str) -> None:
    """Invariant 6 the other way: the abstract name is first come, first
    served, so a successor takes sockets only from a serving process of an
    allowed uid (SO_PEERCRED); it fails instead, and that process serves on.
    (That server would hand its sockets to root: only the successor's own
    check stops the takeover.)"""
    if os.getuid() != 0:
        pytest.skip("needs root to run the serving process as another uid")
    with _served_as(65534, name) as stop:
        v2 = procs.sidecar(name, "v2")
        assert v2.wait(timeout=30) != 0
        assert "runs as uid 65534, not allowed" in procs.logs()
        assert stop(), "v1 did not serve on"


def test_status_of_a_server_of_another_uid_is_not_trusted(procs: Procs, name: str) -> None:
    """Invariant 6 for the status clients: the CLI (PostStart hook and
    readiness probe) and both library clients believe only a server of an
    allowed uid (ours, or ``--allow-uid``): one of another uid that bound
    the name first cannot make a migration look done or a slot ready."""
    if os.getuid() != 0:
        pytest.skip("needs root to run the serving process as another uid")
    address = hotswap.control.control_address(name)

    def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hotswap", *args, "--name", name],
                              capture_output=True, text=True, timeout=60,
                              env=child_env(**env))

    with _served_as(65534, name) as stop:
        for args in (["status"], ["wait-ready", "--version", "v1", "--timeout", "5"],
                     ["probe", "--version", "v1"]):
            run = cli(*args)
            assert run.returncode == 1, (args, run.stdout, run.stderr)
            assert "runs as uid 65534, not allowed" in run.stderr, (args, run.stderr)
            assert "ready" not in run.stdout, (args, run.stdout)
        with pytest.raises(hotswap.HandoverRefused, match="runs as uid 65534"):
            hotswap.control.status_blocking(address, timeout=5)
        with pytest.raises(hotswap.HandoverRefused, match="runs as uid 65534"):
            asyncio.run(hotswap.control.query_status(address, timeout=5))
        # Trusted when allowed: the same server answers (it allows root).
        run = cli("probe", "--version", "v1", "--allow-uid", "65534")
        assert run.returncode == 0 and "ready: serving" in run.stdout, run
        run = cli("probe", "--version", "v1", HOTSWAP_ALLOW_UIDS="10001,65534")
        assert run.returncode == 0 and "ready: serving" in run.stdout, run
        run = cli("probe", "--version", "v1", HOTSWAP_ALLOW_UIDS="nobody")
        assert run.returncode == 2 and "HOTSWAP_ALLOW_UIDS='nobody'" in run.stderr, run
        st = hotswap.control.status_blocking(address, timeout=5,
                                             allowed_uids={0, 65534})
        assert st.version == "v1" and st.state == "serving"
        assert stop(), "the uid-65534 server did not serve on"


def test_the_control_socket_names_the_process_that_serves_now(procs: Procs, name: str) -> None:
    """A client's SO_PEERCRED names whoever last called listen() on the
    control socket, and that socket travels. v1 runs as uid 65534 (and
    allows root); v2, as root, takes over: from then on a status client
    must see v2's uid and pid, not v1's. Otherwise a version whose user
    changed would be refused by its own PostStart hook and readiness probe,
    and the next version would check the first one's uid."""
    if os.getuid() != 0:
        pytest.skip("needs root to run the serving process as another uid")
    address = hotswap.control.control_address(name)

    async def take_over_and_ask() -> tuple[int, str]:
        v2 = hotswap.Upgrader(name, version="v2", options=hotswap.Options(
            env={}, allowed_uids=frozenset({0, 65534})))
        assert await v2.start() is hotswap.Role.TAKEOVER
        sock = v2.listen("http", ("127.0.0.1", 0))
        await v2.ready()
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hotswap", "status", "--json", "--name", name,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env())
        out, _ = await asyncio.wait_for(cli.communicate(), 60)
        assert cli.returncode == 0, out
        st = await hotswap.control.query_status(address, timeout=5)
        assert st.pid == os.getpid() and st.version == "v2"
        sock.close()
        await v2.close()
        return json.loads(out)["pid"], out.decode()

    with _served_as(65534, name) as stop:
        pid, out = asyncio.run(take_over_and_ask())
        assert pid == os.getpid(), out
        assert not stop(), "v1 was not taken over"


LAUNCHED_SUCCESSOR = """
import asyncio, fcntl, json, os, sys
import hotswap
# As systemd (or a launcher like it) starts a service: a socket at fd 3.
passed = int(sys.argv[1])
high = fcntl.fcntl(passed, fcntl.F_DUPFD, 100)
os.close(passed)
os.dup2(high, 3)
os.close(high)
extra_inode = os.fstat(3).st_ino
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "extra"}

async def main():
    upg = hotswap.Upgrader(sys.argv[2], version="v2", options=hotswap.Options(env=env))
    role = await upg.start()
    upg.listen("http", ("127.0.0.1", int(sys.argv[3])))
    await upg.ready()
    try:
        still_there = os.fstat(3).st_ino == extra_inode
    except OSError:
        still_there = False
    print(json.dumps({"role": role.value, "extra still open": still_there}))
    await upg.close()

asyncio.run(main())
"""


def test_a_successor_started_with_launcher_sockets_leaves_none_open(
        procs: Procs, name: str) -> None:
    """A successor that takes over while its launcher (systemd) passed it
    sockets too: those it does not use are closed like any inherited socket
    nobody claimed (they leaked: open, and inherited by its children)."""
    v1 = procs.sidecar(name, "v1")
    port = port_of(wait_for(serving(name, "v1"), 15, "v1 serving"))
    extra = socket.socket()
    extra.bind(("127.0.0.1", 0))
    extra.listen()
    child = subprocess.run(
        [sys.executable, "-c", LAUNCHED_SUCCESSOR, str(extra.fileno()), name, str(port)],
        pass_fds=(extra.fileno(),), env=child_env(), capture_output=True, text=True,
        timeout=60)
    extra.close()
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == {"role": "takeover", "extra still open": False}
    assert v1.wait(timeout=30) == 0  # taken over, drained
