"""Binding, describing, validating and adopting sockets."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import PY, ROOT, Procs, child_env, until, wait_for

import hotswap
from hotswap.errors import ListenerError
from hotswap.listeners import (
    adopt_connection_fd,
    adopt_fd,
    bind,
    describe,
    matches,
    systemd_sockets,
    wanted_info,
)
from hotswap.protocol import SocketInfo


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_bind_and_describe_tcp_unix() -> None:
    tcp = bind(("127.0.0.1", 0))
    info = describe("http", tcp)
    assert info.family == "inet" and info.kind == "stream"
    assert info.address == f"127.0.0.1:{tcp.getsockname()[1]}"
    assert not tcp.get_inheritable()
    assert matches(info, wanted_info("http", ("127.0.0.1", 0)))
    assert not matches(info, wanted_info("http", ("127.0.0.2", 0)))
    tcp.close()
    name = f"@hotswap-test-abstract-{uuid.uuid4().hex}"
    abstract = bind(name)
    assert describe("c", abstract).address == name
    abstract.close()


def test_a_host_that_is_no_name_is_a_listener_error() -> None:
    with pytest.raises(ListenerError, match="cannot bind"):
        bind(("bad\udcff", 0))


def test_bind_ipv6_when_available() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    try:
        sock = bind(("::1", 0))
    except ListenerError as exc:
        pytest.skip(f"::1 not configured here: {exc}")
    assert describe("v6", sock).address.startswith("[::1]:")
    sock.close()



def bound(host: str) -> socket.socket:
    """A listener bound to (host, any port); the test skipped if this is an
    IPv6 address and IPv6 is not configured here."""
    try:
        return bind((host, 0))
    except ListenerError as exc:
        if ":" not in host:
            raise
        pytest.skip(f"{host} not available here: {exc}")


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


@pytest.mark.parametrize("host", [
    "localhost", "", "0.0.0.0", "0", "127.0.0.1", "127.1",
    "::1", "::0001", "0:0:0:0:0:0:0:1", "::", "::0", "::ffff:127.0.0.1", "::ffff:7f00:1"])
def test_what_bind_binds_matches_its_own_request(host: str) -> None:
    """What a predecessor bound for a request is what the same request in
    the successor matches, however the host was spelt (the reviewer's bug:
    ("localhost", P) was bound to 127.0.0.1:P and then never matched)."""
    with bound(host) as sock:
        have = describe("http", sock)
        port = port_of(sock)
        assert matches(have, wanted_info("http", (host, port))), have.address
        assert matches(have, wanted_info("http", (host, 0))), have.address
        assert not matches(have, wanted_info("http", (host, port + 1)))
        assert not matches(have, wanted_info("http", (host, port), kind="dgram"))


def link_local() -> tuple[str, str, int]:
    """A link-local IPv6 address of this host: (address, interface name,
    interface index); the test skipped if there is none."""
    try:
        with open("/proc/net/if_inet6") as table:
            rows = [line.split() for line in table]
    except OSError:
        rows = []
    for hexaddr, index, _, scope, _, ifname in (r for r in rows if len(r) == 6):
        if int(scope, 16) == 0x20 and ifname != "lo":  # IPV6_ADDR_LINKLOCAL
            packed = bytes.fromhex(hexaddr)
            return socket.inet_ntop(socket.AF_INET6, packed), ifname, int(index, 16)
    pytest.skip("no link-local IPv6 address here")


def test_a_scoped_link_local_address_binds_and_matches_its_request() -> None:
    """("fe80::...%eth0", port): a link-local address needs its scope (the
    interface), which socket.bind() drops from a (host, port) pair (it sets
    the scope id of the address it resolved to 0): every bind failed with
    EINVAL. Bound with its scope, its listener matches the same request in
    a successor, the interface by name or by number."""
    address, ifname, index = link_local()
    for host in (f"{address}%{ifname}", f"{address}%{index}"):
        with bind((host, 0)) as sock:
            assert sock.getsockname()[3] == index
            have = describe("ll", sock)
            assert have.address == f"[{address}%{ifname}]:{port_of(sock)}"
            for same in (f"{address}%{ifname}", f"{address}%{index}"):
                assert matches(have, wanted_info("ll", (same, port_of(sock)))), same
                assert matches(have, wanted_info("ll", (same, 0))), same
            # The same address on another interface is another address (the
            # scope was dropped, and a successor could take this listener
            # for one there, or refuse to bind one there beside it).
            other = next(i for i, _ in socket.if_nameindex() if i != index)
            for elsewhere in (f"{address}%{other}", address):
                assert not matches(have, wanted_info("ll", (elsewhere, 0))), elsewhere

    async def handover() -> None:  # validated and inherited with its scope
        old, new = two_versions(f"ll-{uuid.uuid4().hex[:12]}")
        try:
            await old.start()
            old_sock = old.listen("ll", (f"{address}%{ifname}", 0))
            await old.ready()
            assert await new.start() is hotswap.Role.TAKEOVER
            new_sock = new.listen("ll", (f"{address}%{index}", port_of(old_sock)))
            assert os.fstat(new_sock.fileno()).st_ino == os.fstat(old_sock.fileno()).st_ino
        finally:
            await new.close()  # before confirming: v1 serves on
            await old.close()

    asyncio.run(asyncio.wait_for(handover(), 30))


def check_spellings(name: str, sock: socket.socket, shown: str, same: Sequence[str],
                    other: Sequence[str]) -> None:
    """``sock`` is described as ``shown`` (``{port}`` filled in), and matches
    a request for its port under each host in ``same``, none in ``other``."""
    have = describe(name, sock)
    port = port_of(sock)
    assert have.address == shown.format(port=port)
    for host in same:
        assert matches(have, wanted_info(name, (host, port))), host
    for host in other:
        assert not matches(have, wanted_info(name, (host, port))), host


def test_ipv4_spellings_compare_as_addresses() -> None:
    with bind(("localhost", 0)) as loopback:
        check_spellings("http", loopback, "127.0.0.1:{port}", ("127.0.0.1", "127.1", "localhost"),
                        ("127.0.0.2", "0.0.0.0", "", "::1", "::ffff:127.0.0.1"))
    with bind(("", 0)) as wildcard:
        check_spellings("http", wildcard, "0.0.0.0:{port}", ("", "0.0.0.0", "0"),
                        ("127.0.0.1", "localhost", "::"))


def test_ipv6_spellings_compare_as_addresses() -> None:
    with bound("::1") as v6:
        # "[::1]" is not something bind accepts, so it matches nothing either.
        with pytest.raises(ListenerError):
            bind(("[::1]", 0))
        check_spellings("v6", v6, "[::1]:{port}", ("::1", "::0001", "0::1", "0:0:0:0:0:0:0:1"),
                        ("[::1]", "::", "::2", "::ffff:127.0.0.1", "127.0.0.1", "localhost"))
    with bound("::ffff:7f00:1") as mapped:
        check_spellings("mapped", mapped, "[::ffff:127.0.0.1]:{port}",
                        ("::ffff:127.0.0.1", "::ffff:7f00:1", "0:0:0:0:0:ffff:7f00:1"),
                        ("127.0.0.1", "::1", "::"))


def test_port_zero_matches_any_port_of_the_same_address() -> None:
    with bind(("localhost", 0)) as sock:
        have = describe("http", sock)
        for same in ("localhost", "127.0.0.1", "127.1"):
            assert matches(have, wanted_info("http", (same, 0))), same
        for other in ("127.0.0.2", "", "0.0.0.0"):
            assert not matches(have, wanted_info("http", (other, 0))), other


def test_unix_paths_made_absolute_abstract_names_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with bind("ctl.sock") as relative:
        have = describe("ctl", relative)
        assert have.address == "ctl.sock"  # reported as bind was given it
        for same in ("ctl.sock", "./ctl.sock", str(tmp_path / "ctl.sock"),
                     str(tmp_path / "sub" / ".." / "ctl.sock")):
            assert matches(have, wanted_info("ctl", same)), same
        for other in ("other.sock", "@ctl.sock", "", str(tmp_path)):
            assert not matches(have, wanted_info("ctl", other)), other
    name = f"hotswap-test-abstract-{uuid.uuid4().hex}"
    with bind("@" + name) as abstract:
        have = describe("a", abstract)
        assert matches(have, wanted_info("a", "@" + name))
        assert matches(have, wanted_info("a", "\0" + name))
        for other in (name, "@" + name + "x", "@./" + name, ""):
            assert not matches(have, wanted_info("a", other)), other


def test_only_host_names_are_resolved_and_any_of_their_addresses_matches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolution is the one step that can wait (on DNS): numeric addresses,
    the wildcard, identical text and a port or family that cannot match
    never reach getaddrinfo; a name is resolved in the family bind would use,
    and matches whichever of its addresses the predecessor bound (bind takes
    the first, which can rotate between lookups)."""
    asked: list[tuple[str, int]] = []
    answers = {"multi.test": ["10.0.0.1", "127.0.0.1"]}

    def fake_getaddrinfo(host: str | bytes, port: object, family: int = 0,
                         *rest: object) -> list[tuple[socket.AddressFamily, socket.SocketKind,
                                                      int, str, tuple[str, int]]]:
        host = host.decode() if isinstance(host, bytes) else host
        asked.append((host, family))
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    have = SocketInfo(name="h", family="inet", kind="stream", address="127.0.0.1:8080")
    for numeric in (("127.0.0.1", 8080), ("127.0.0.1", 0), ("0.0.0.0", 8080), ("", 8080),
                    ("localhost", 9090), ("::1", 8080)):
        matches(have, wanted_info("h", numeric))
    assert asked == []
    assert matches(have, wanted_info("h", ("multi.test", 8080)))
    assert asked == [("multi.test", socket.AF_INET)]
    assert not matches(have, wanted_info("h", ("nowhere.test", 8080)))  # no exception
    other = SocketInfo(name="h", family="inet", kind="stream", address="127.0.0.2:8080")
    assert not matches(other, wanted_info("h", ("multi.test", 8080)))
    monkeypatch.undo()
    # Names nobody can resolve (bind fails on them too) just do not match;
    # these are no valid DNS names, so no query is ever sent for them.
    for bad in ("bad\udcff", "x..y", "a" * 300):
        assert not matches(have, wanted_info("h", (bad, 8080))), bad

def test_filesystem_unix_socket_is_owner_only(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    sock = bind(path, unix_mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    sock.close()


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_a_unix_path_left_over_is_bound_again_a_live_one_is_not(
        tmp_path: Path, kind: str) -> None:
    """A Unix socket's path outlives its socket: after the last version
    stopped (or died), a fresh start must bind it again (it failed with
    EADDRINUSE: a crash loop; for a datagram socket until this was probed
    as one too). A path someone listens on stays theirs, and a file that is
    no socket is never removed."""
    path = str(tmp_path / "svc.sock")
    first = bind(path, kind=kind)
    with pytest.raises(ListenerError, match="Address already in use"):
        bind(path, kind=kind)  # live: theirs
    first.close()
    assert os.path.exists(path)  # left over
    again = bind(path, kind=kind)
    client = socket.socket(socket.AF_UNIX, again.type)
    client.connect(path)  # it is ours now, and listening (or reading)
    if kind == "dgram":
        client.send(b"to the new one")
        assert again.recv(100) == b"to the new one"
    client.close()
    again.close()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM if kind == "stream"
                          else socket.SOCK_STREAM)
    other.bind(str(tmp_path / "other.sock"))
    if kind == "dgram":
        other.listen()
    with pytest.raises(ListenerError, match="Address already in use"):
        bind(str(tmp_path / "other.sock"), kind=kind)  # live, of the other type
    other.close()
    plain = tmp_path / "not-a-socket"
    plain.write_text("data")
    with pytest.raises(ListenerError):
        bind(str(plain), kind=kind)
    assert plain.read_text() == "data"


def test_the_stale_path_probe_never_waits_nor_follows_a_link(tmp_path: Path) -> None:
    """A live listener whose queue is full (hung, stopped, draining) is
    live: bind() fails at once (the probe's connect used to wait for it to
    accept, for good). A symbolic link to a stale socket is the admin's:
    left as it is."""
    path = str(tmp_path / "full.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(0)
    queued = []
    for _ in range(100):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            client.connect(path)
        except BlockingIOError:
            client.close()
            break
        queued.append(client)
    try:
        with pytest.raises(ListenerError, match="Address already in use"):
            bind(path)
    finally:
        for client in queued:
            client.close()
        live.close()
    link = tmp_path / "link.sock"
    link.symlink_to(path)  # path is stale now
    with pytest.raises(ListenerError):
        bind(str(link))
    assert link.is_symlink()


def test_odd_addresses_are_listener_errors_and_abstract_names_keep_their_bytes() -> None:
    with pytest.raises(ListenerError, match="cannot bind"):
        bind(("127.0.0.1", 70000))  # was a bare OverflowError
    sock = bind("@\0odd-" + os.urandom(4).hex())  # an abstract name starting with NUL
    try:
        assert describe("x", sock).address.startswith("@\0odd-")
    finally:
        sock.close()


@pytest.mark.parametrize("address", [
    b"/tmp/hotswap-test-bytes", (None, 0), ("127.0.0.1", "80"), ("127.0.0.1", True),
    ("127.0.0.1", 65536), ("127.0.0.1", -1), ["127.0.0.1", 0], ("127.0.0.1",), 8080,
    "/tmp/hotswap-test-nul\0.sock", "/tmp/hotswap-test-\ud800.sock", "@\ud800"],
    ids=repr)
def test_what_is_no_address_is_a_listener_error_and_leaks_nothing(address: object) -> None:
    """listen() and bind() given something that is no address say what is
    wrong with it, as a ListenerError, before creating a socket (a bytes
    path was a bare ValueError, "too many values to unpack", and a None
    host a TypeError, "argument of type 'NoneType' is not iterable"; a
    filesystem path with a NUL, or a path no bytes can spell, a bare
    ValueError from the stale-path probe)."""
    upgrader = hotswap.Upgrader(f"t-{uuid.uuid4().hex[:12]}", options=hotswap.Options(env={}))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ListenerError, match=r"^http: cannot listen on .+: (a|an|the) "):
        upgrader.listen("http", address)  # type: ignore[arg-type]
    with pytest.raises(ListenerError, match=r"^cannot bind .+: (a|an|the) "):
        bind(address)  # type: ignore[arg-type]
    assert len(os.listdir("/proc/self/fd")) == before

    async def name_still_free() -> None:
        await upgrader.start()
        with upgrader.listen("http", ("127.0.0.1", 0)):
            pass
        await upgrader.close()

    asyncio.run(name_still_free())


@pytest.mark.parametrize("kind", ["stream", "dgram"])
def test_bind_conflict_is_a_clear_error(kind: str) -> None:
    first = bind(("127.0.0.1", 0), kind=kind)
    port = first.getsockname()[1]
    for host in ("127.0.0.1", "0.0.0.0"):  # UDP ports were shared (SO_REUSEADDR)
        with pytest.raises(ListenerError, match=r"cannot bind .*Address already in use"):
            bind((host, port), kind=kind)
    first.close()


def test_adopt_valid_listener() -> None:
    sock = bind(("127.0.0.1", 0))
    info = describe("http", sock)
    fd = os.dup(sock.fileno())
    os.set_inheritable(fd, True)  # os.dup's copy is close-on-exec already
    adopted = adopt_fd(fd, info)
    assert adopted.fileno() == fd and not adopted.get_inheritable()
    assert not adopted.getblocking()
    adopted.close()
    sock.close()


def test_adopt_a_connection() -> None:
    """A handed-over connection is adopted as it is: the same descriptor,
    now non-blocking and close-on-exec, still connected to its client."""
    listener = bind(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    ours, _ = listener.accept()
    fd = ours.detach()
    os.set_inheritable(fd, True)
    adopted = adopt_connection_fd(fd)
    try:
        assert adopted.fileno() == fd and not adopted.get_inheritable()
        assert not adopted.getblocking()
        adopted.sendall(b"adopted")
        assert client.recv(10) == b"adopted"
    finally:
        for sock in (adopted, client, listener):
            sock.close()


@pytest.mark.parametrize("case", ["pipe", "unix", "listening", "unconnected", "udp"])
def test_adopt_connection_rejects_and_closes(case: str) -> None:
    """What is no connected TCP stream socket (a pipe, a Unix-socket
    connection, a listener, a TCP socket connected to nobody, UDP) is a
    ListenerError, and the descriptor is closed, never leaked."""
    extra: list[socket.socket] = []
    if case == "pipe":
        fd, w = os.pipe()
        os.close(w)
    elif case == "unix":
        ours, theirs = socket.socketpair()
        extra.append(theirs)
        fd = ours.detach()
    elif case == "listening":
        fd = bind(("127.0.0.1", 0)).detach()
    elif case == "unconnected":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        fd = sock.detach()
    else:
        fd = bind(("127.0.0.1", 0), kind="dgram").detach()
    with pytest.raises(ListenerError):
        adopt_connection_fd(fd)
    assert not is_open(fd)
    for sock in extra:
        sock.close()


@pytest.mark.parametrize("case", ["pipe", "not-listening", "wrong-address", "wrong-family"])
def test_adopt_rejects_and_closes(case: str) -> None:
    """Whatever is wrong, the received descriptor is closed, never leaked."""
    extra: list[int] = []
    if case == "pipe":
        fd, w = os.pipe()
        extra.append(w)
        declared = SocketInfo(name="x", family="inet", kind="stream", address="127.0.0.1:1")
    else:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        if case != "not-listening":
            sock.listen()
        port = sock.getsockname()[1]
        address = f"127.0.0.1:{port + 1 if case == 'wrong-address' else port}"
        family = "inet6" if case == "wrong-family" else "inet"
        declared = SocketInfo(name="x", family=family, kind="stream", address=address)
        fd = sock.detach()
    with pytest.raises(ListenerError):
        adopt_fd(fd, declared)
    assert not is_open(fd)
    for other in extra:
        os.close(other)


AS_SYSTEMD = """
import fcntl, os


def as_systemd(passed):
    # As systemd starts a service: the descriptors passed at fds 3, 4, ...
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in passed]
    for fd in passed:
        os.close(fd)
    for target, fd in enumerate(high, 3):
        os.dup2(fd, target)
        os.close(fd)
"""
"""The start of the systemd children's scripts below: ``as_systemd()``
moves the descriptors the test passed to where systemd puts them."""


SYSTEMD_CHILD = AS_SYSTEMD + """
import asyncio, json, os, socket, sys
import hotswap
# As systemd starts a service: the sockets at fds 3, 4, 5 (here a pipe at 4).
as_systemd([int(fd) for fd in sys.argv[1:4]])
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "3",
       "LISTEN_FDNAMES": "http:junk:admin"}

async def main():
    upg = hotswap.Upgrader(sys.argv[6], options=hotswap.Options(env=env))
    await upg.start()
    http = upg.listen("http", ("127.0.0.1", int(sys.argv[4])))
    admin = upg.listen("admin", sys.argv[5], kind="stream")
    await upg.ready()
    http.setblocking(True)
    http.settimeout(10)
    conn, _ = http.accept()
    conn.sendall(b"from the inherited listener")
    conn.close()
    print(json.dumps({"http": http.fileno(), "admin": admin.fileno()}))
    await upg.close()

asyncio.run(main())
"""


def test_systemd_sockets_are_adopted_by_name(tmp_path: Path) -> None:
    """Socket activation: a fresh start takes the listeners systemd passed
    (LISTEN_FDS at fds 3.., named by LISTEN_FDNAMES) instead of binding, in a
    real process started that way; a descriptor that is no socket is closed."""
    tcp = bind(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    path = str(tmp_path / "admin.sock")
    unix = bind(path)
    r, w = os.pipe()
    name = f"t-{uuid.uuid4().hex[:12]}"
    fds = (tcp.fileno(), r, unix.fileno())
    child = subprocess.Popen([sys.executable, "-c", SYSTEMD_CHILD, *map(str, fds), str(port),
                              path, name], pass_fds=fds, env=child_env(),
                             stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for sock in (tcp, unix):
            sock.close()
        os.close(r)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            assert conn.recv(100) == b"from the inherited listener"
        # By now the child has started: it closed the pipe, the only reader.
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
        out, err = child.communicate(timeout=30)
    finally:
        os.close(w)
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    assert json.loads(out) == {"http": 3, "admin": 5}, err


SYSTEMD_MISCOUNT_CHILD = AS_SYSTEMD + """
import asyncio, os, socket, sys, threading
import hotswap
# The launcher passed one socket, at fd 3, but says LISTEN_FDS=3: fds 4 and
# 5 are whatever this process opened since (the event loop's epoll and
# wake-up socket).
as_systemd([int(sys.argv[1])])
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "3"}

async def serve_once(upg, address):
    await upg.start()
    sock = upg.listen("http", address)
    server = await asyncio.start_server(
        lambda r, w: (w.write(b"answered"), w.close()), sock=sock)
    await upg.ready()
    # The loop still wakes up from another thread (its wake-up socket), and
    # its poller still works (the accept below).
    woken = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    threading.Thread(target=loop.call_soon_threadsafe,
                     args=(woken.set_result, None)).start()
    await asyncio.wait_for(woken, 10)
    print("SERVING", sock.getsockname()[1], flush=True)
    await asyncio.wait_for(sys_stdin_line(), 30)
    await hotswap.close_server(server)
    await upg.release()
    await upg.close()

async def sys_stdin_line():
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

async def main():
    await serve_once(hotswap.Upgrader(sys.argv[2], options=hotswap.Options(env=env)),
                     ("127.0.0.1", int(sys.argv[3])))
    # Started again in the same process (a retry): fd 3 is another socket of
    # ours by now, not the launcher's.
    mine = socket.socket()
    await serve_once(hotswap.Upgrader(sys.argv[2] + "-again", options=hotswap.Options(env=env)),
                     ("127.0.0.1", 0))
    os.fstat(mine.fileno())  # still open
    mine.close()

asyncio.run(main())
"""


def test_systemd_descriptors_this_process_opened_itself_are_left_alone() -> None:
    """LISTEN_FDS counts more descriptors than the launcher passed (or the
    process starts an upgrader a second time): the numbers past the
    launcher's are descriptors this process opened itself, close-on-exec as
    everything Python opens, and are left alone. They were taken as systemd
    sockets or closed as "no socket": the event loop's epoll descriptor
    closed (its next poll failed with EINVAL), its wake-up socket closed as
    an unclaimed listener, and on a second start a socket of the app's."""
    tcp = bind(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    tcp.set_inheritable(True)  # passed across exec, as a launcher does
    name = f"t-{uuid.uuid4().hex[:12]}"
    child = subprocess.Popen([sys.executable, "-c", SYSTEMD_MISCOUNT_CHILD, str(tcp.fileno()),
                              name, str(port)], pass_fds=(tcp.fileno(),), env=child_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        tcp.close()
        for round_ in range(2):
            # One line, then the child waits for ours: nothing more is buffered.
            readable, _, _ = select.select([child.stdout], [], [], 30)
            assert readable, "the child did not serve within 30 s"
            line = child.stdout.readline()
            assert line.startswith("SERVING "), f"{line!r}: {child.communicate(timeout=30)}"
            served = line.split()[1]
            if round_ == 0:
                assert int(served) == port  # the launcher's socket, inherited
            with socket.create_connection(("127.0.0.1", int(served)), timeout=10) as conn:
                assert conn.recv(100) == b"answered"
            child.stdin.write("next\n")
            child.stdin.flush()
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    assert "LISTEN_FDS" in err  # what was left alone is said


SYSTEMD_TAKEN_CHILD = AS_SYSTEMD + """
import json, logging, os, socket, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from hotswap.listeners import systemd_sockets
as_systemd([int(sys.argv[1])])
# What sd_listen_fds() does to each descriptor it returns (python-systemd's
# listen_fds() calls it): close-on-exec, LISTEN_FDS left set when asked to.
os.set_inheritable(3, False)
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
taken = systemd_sockets(env, os.getpid())
mine = socket.socket(fileno=3)  # still the library's caller's, and open
print(json.dumps({"taken": sorted(taken), "listening": mine.getsockopt(
    socket.SOL_SOCKET, socket.SO_ACCEPTCONN), "port": mine.getsockname()[1]}))
"""


def test_systemd_sockets_a_library_took_already_are_left_to_it() -> None:
    """A launcher's socket that a library of the process has taken already
    (``sd_listen_fds()`` marks it close-on-exec and may leave LISTEN_FDS
    set) is not taken again: it stays open for its owner, and the warning
    says what may have marked it, since nothing else tells the two apart."""
    tcp = bind(("127.0.0.1", 0))
    tcp.set_inheritable(True)
    try:
        out = subprocess.run([sys.executable, "-c", SYSTEMD_TAKEN_CHILD, str(tcp.fileno())],
                             pass_fds=(tcp.fileno(),), env=child_env(), capture_output=True,
                             text=True, timeout=30, check=True)
        assert json.loads(out.stdout) == {"taken": [], "listening": 1,
                                          "port": tcp.getsockname()[1]}, out.stderr
    finally:
        tcp.close()
    assert "LISTEN_FDS=1: 1 descriptor(s) from fd 3 on are close-on-exec" in out.stderr
    assert "sd_listen_fds()" in out.stderr, out.stderr


SYSTEMD_NAMES_CHILD = AS_SYSTEMD + """
import json, os, sys
from hotswap.listeners import systemd_sockets
as_systemd([int(fd) for fd in sys.argv[1:3]])
env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:"}
other = systemd_sockets(env, os.getpid())  # another process's (here: init's)
left = [os.get_inheritable(fd) for fd in (3, 4)]  # raises if one was closed
env["LISTEN_PID"] = str(os.getpid())
taken = systemd_sockets(env, os.getpid())
print(json.dumps({"other": sorted(other), "left": left,
                  "taken": {name: [s.fileno(), s.get_inheritable()]
                            for name, s in taken.items()}}))
"""


def test_systemd_sockets_for_another_pid_are_left_alone_ours_named_and_close_on_exec() -> None:
    """LISTEN_PID of another process: its variables are not ours (a
    child that inherited the environment), and the descriptors are left as
    they are. Ours: an empty name in LISTEN_FDNAMES is ``fdN``, and each
    socket taken is close-on-exec from then on (a child the process runs
    must not hold a listener)."""
    first, second = bind(("127.0.0.1", 0)), bind(("127.0.0.1", 0))
    fds = (first.fileno(), second.fileno())
    try:
        out = subprocess.run([sys.executable, "-c", SYSTEMD_NAMES_CHILD, *map(str, fds)],
                             pass_fds=fds, env=child_env(), capture_output=True,
                             text=True, timeout=30, check=True)
    finally:
        first.close()
        second.close()
    assert json.loads(out.stdout) == {"other": [], "left": [True, True],
                                      "taken": {"web": [3, False], "fd4": [4, False]}}, out


SYSTEMD_ONE_UNIT_CHILD = AS_SYSTEMD + """
import asyncio, json, logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
import hotswap
# One socket unit with two ListenStream= lines: systemd names every
# descriptor of a unit the same (FileDescriptorName=, else the unit's name).
as_systemd([int(fd) for fd in sys.argv[1:3]])
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2",
       "LISTEN_FDNAMES": "web.socket:web.socket"}

async def main():
    upg = hotswap.Upgrader(sys.argv[5], options=hotswap.Options(env=env))
    await upg.start()
    http = upg.listen("http", ("127.0.0.1", int(sys.argv[3])))
    https = upg.listen("https", ("127.0.0.1", int(sys.argv[4])))
    await upg.ready()
    print(json.dumps({"http": http.fileno(), "https": https.fileno()}), flush=True)
    https.setblocking(True)
    https.settimeout(10)
    conn, _ = https.accept()
    conn.sendall(b"from the second socket of the unit")
    conn.close()
    await upg.close()

asyncio.run(main())
"""


def test_systemd_sockets_of_one_unit_sharing_a_name_are_all_inherited() -> None:
    """A socket unit with several Listen lines passes them all under one
    name (systemd's FileDescriptorName= is the unit's, for each of its
    descriptors). Every one is a listener to inherit, found by its address:
    the second used to be closed as a "duplicate", and listen() on its
    address then bound anew and failed with EADDRINUSE, systemd holding
    its own copy (as the launcher here does)."""
    first, second = bind(("127.0.0.1", 0)), bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in (first, second)]
    fds = (first.fileno(), second.fileno())
    name = f"t-{uuid.uuid4().hex[:12]}"
    child = subprocess.Popen([sys.executable, "-c", SYSTEMD_ONE_UNIT_CHILD, *map(str, fds),
                              *ports, name], pass_fds=fds, env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    try:  # the launcher keeps its copies open, as systemd does
        readable, _, _ = select.select([child.stdout], [], [], 30)
        assert readable, "the child did not start within 30 s"
        listening = child.stdout.readline()
        assert listening, child.communicate(timeout=30)
        with socket.create_connection(("127.0.0.1", int(ports[1])), timeout=10) as conn:
            answer = conn.recv(100)
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        first.close()
        second.close()
    assert json.loads(listening) == {"http": 3, "https": 4}, err
    assert answer == b"from the second socket of the unit", err
    assert child.returncode == 0, err


SYSTEMD_REUSEPORT_CHILD = AS_SYSTEMD + """
import asyncio, json, os, sys
import hotswap
from hotswap.errors import ListenerError
as_systemd([int(fd) for fd in sys.argv[1:3]])
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "w0:w1"}

async def main():
    upg = hotswap.Upgrader(sys.argv[4], options=hotswap.Options(env=env))
    await upg.start()
    address = ("127.0.0.1", int(sys.argv[3]))
    got = {name: upg.listen(name, address).fileno() for name in ("w0", "w1")}
    try:
        upg.listen("w2", address)
    except ListenerError as exc:
        got["w2"] = str(exc)
    await upg.ready()
    print(json.dumps(got))
    await upg.close()

asyncio.run(main())
"""


def test_a_reuseport_group_passed_by_a_launcher_is_inherited_whole() -> None:
    """Two SO_REUSEPORT sockets on one port (a launcher's, under two
    names) are two listeners at one address: each is inherited by its
    name; a third name there, which would have to be bound, is refused
    naming the first."""
    group: list[socket.socket] = []
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", group[0].getsockname()[1] if group else 0))
        sock.listen()
        group.append(sock)
    port = group[0].getsockname()[1]
    fds = tuple(s.fileno() for s in group)
    try:
        out = subprocess.run([sys.executable, "-c", SYSTEMD_REUSEPORT_CHILD, *map(str, fds),
                              str(port), f"t-{uuid.uuid4().hex[:12]}"], pass_fds=fds,
                             env=child_env(), capture_output=True, text=True, timeout=30)
    finally:
        for sock in group:
            sock.close()
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert (got["w0"], got["w1"]) == (3, 4), out.stderr
    assert "listener 'w0' of this process" in got["w2"]


SYSTEMD_SEQPACKET_CHILD = AS_SYSTEMD + """
import asyncio, logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
import hotswap
as_systemd([int(sys.argv[1])])
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"}

async def main():
    upg = hotswap.Upgrader(sys.argv[2], options=hotswap.Options(env=env))
    await upg.start()
    await upg.ready()
    await upg.close()

asyncio.run(main())
"""


def test_a_launcher_socket_of_a_kind_hotswap_does_not_serve_is_said_as_it_is_closed(
        ) -> None:
    """A socket the launcher passed that is neither a stream nor a datagram
    one of the inet, inet6 or unix family (systemd's
    ListenSequentialPacket=, say) cannot be a listener: it is closed, with
    a warning naming it. It used to vanish without a word."""
    seq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    seq.bind("\0" + f"t-seq-{uuid.uuid4().hex[:12]}")
    seq.listen()
    seq.set_inheritable(True)
    try:
        out = subprocess.run([sys.executable, "-c", SYSTEMD_SEQPACKET_CHILD, str(seq.fileno()),
                              f"t-{uuid.uuid4().hex[:12]}"], pass_fds=(seq.fileno(),),
                             env=child_env(), capture_output=True, text=True, timeout=30)
    finally:
        seq.close()
    assert out.returncode == 0, out.stderr
    assert "WARNING" in out.stderr and "control" in out.stderr and "fd 3" in out.stderr, \
        out.stderr


SYSTEMD_CONNECTION_CHILD = AS_SYSTEMD + """
import asyncio, json, logging, os, socket, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
import hotswap
as_systemd([int(sys.argv[1])])
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web.socket"}

async def main():
    upg = hotswap.Upgrader(sys.argv[2], options=hotswap.Options(env=env))
    await upg.start()
    sock = upg.listen("http", ("127.0.0.1", int(sys.argv[3])))
    print(json.dumps({"listening": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)}))
    await upg.close()

asyncio.run(main())
"""


def test_a_connection_a_launcher_passed_is_no_listener() -> None:
    """systemd's Accept=yes passes a connection, not a listener, bound to
    the very address the service listens on. listen() returned it as the
    listener (asyncio's server then failed with EINVAL, an accept loop
    with EINVAL at each call); it is no listener: closed with a warning
    that says what it is, and the listener is bound."""
    with socket.socket() as server:
        # As bind() does: the connection keeps it, and a listener binds beside it.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname(), timeout=10)
        conn, _ = server.accept()
    port = conn.getsockname()[1]
    conn.set_inheritable(True)
    try:
        with conn:
            out = subprocess.run([sys.executable, "-c", SYSTEMD_CONNECTION_CHILD,
                                  str(conn.fileno()), f"t-{uuid.uuid4().hex[:12]}", str(port)],
                                 pass_fds=(conn.fileno(),), env=child_env(),
                                 capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"listening": 1}, out.stderr
        assert "not listening" in out.stderr and "fd 3" in out.stderr, out.stderr
        client.settimeout(10)
        assert client.recv(10) == b""  # closed: nobody else had it
    finally:
        client.close()


SYSTEMD_LONG_NAME_CHILD = AS_SYSTEMD + """
import asyncio, json, logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
import hotswap
as_systemd([int(sys.argv[1])])
# systemd takes a FileDescriptorName= of up to 255 characters.
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "n" * 255}

async def main():
    upg = hotswap.Upgrader(sys.argv[2], options=hotswap.Options(env=env))
    try:
        await upg.start()
        sock = upg.listen("http", ("127.0.0.1", int(sys.argv[3])))
        print(json.dumps({"http": sock.fileno()}))
    finally:
        await upg.close()

asyncio.run(main())
"""


def test_a_launcher_name_longer_than_a_listener_name_is_taken_as_none() -> None:
    """A name systemd passes (up to 255 characters) that is longer than a
    listener's may be (200) is taken as no name: the socket is ``fd3``,
    found by its address, with a warning. start() raised
    LocalProtocolError ("socket name must be 1-200 characters") instead,
    and the service never started."""
    launcher = bind(("127.0.0.1", 0))
    port = launcher.getsockname()[1]
    launcher.set_inheritable(True)
    try:
        out = subprocess.run([sys.executable, "-c", SYSTEMD_LONG_NAME_CHILD,
                              str(launcher.fileno()), f"t-{uuid.uuid4().hex[:12]}", str(port)],
                             pass_fds=(launcher.fileno(),), env=child_env(),
                             capture_output=True, text=True, timeout=30)
    finally:
        launcher.close()
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"http": 3}, out.stderr
    assert "WARNING" in out.stderr and "fd3" in out.stderr, out.stderr


SYSTEMD_SUCCESSOR_CHILD = AS_SYSTEMD + """
import asyncio, json, os, socket, sys
import hotswap
as_systemd([int(sys.argv[1])])
env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}

async def main():
    upg = hotswap.Upgrader(sys.argv[2], version="v2",
                           options=hotswap.Options(env=env, message_timeout=5.0))
    try:
        role = await upg.start()
        try:
            os.fstat(3)
            kept = True
        except OSError:
            kept = False
        try:
            sock = upg.listen("http", ("127.0.0.1", int(sys.argv[3])))
        except hotswap.ListenerError as exc:
            print(json.dumps({"role": role.value, "error": str(exc)}))
            return
        print(json.dumps({"role": role.value, "http": sock.fileno(),
                          "port": sock.getsockname()[1], "fd 3 kept": kept}))
    finally:
        await upg.close()  # before confirming: the predecessor serves on

asyncio.run(main())
"""


@pytest.mark.parametrize("launched", ["moved", "same"])
def test_a_launcher_socket_under_a_name_the_predecessor_used_elsewhere_is_kept(
        launched: str) -> None:
    """A successor whose launcher passes "http" at a new port, while its
    predecessor hands over its "http" at the old one (the version moves
    "http"): listen("http", new port) takes the launcher's socket, found by
    its address. The launcher's was closed at once as the predecessor's
    copy of that name, and the bind anew failed with EADDRINUSE (the
    launcher, as systemd does, holds its own copy): the upgrade failed.
    ("same": the launcher passes the very socket the predecessor hands
    over, under its name: that copy is closed at once, as before, and the
    predecessor's is the one listen() returns.)"""
    name = f"t-{uuid.uuid4().hex[:12]}"

    async def main() -> dict[str, object]:
        old = hotswap.Upgrader(name, version="v1", options=hotswap.Options(
            env={}, message_timeout=5.0, handover_timeout=10.0))
        launcher = bind(("127.0.0.1", 0))  # kept open, as systemd keeps its copy
        try:
            await old.start()
            old_sock = old.listen("http", ("127.0.0.1", 0))
            await old.ready()
            if launched == "same":
                launcher.close()
                launcher = socket.socket(fileno=os.dup(old_sock.fileno()))
            launcher.set_inheritable(True)
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", SYSTEMD_SUCCESSOR_CHILD, str(launcher.fileno()), name,
                str(launcher.getsockname()[1]), pass_fds=(launcher.fileno(),),
                env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(child.communicate(), 30)
            assert child.returncode == 0, err.decode()
            got: dict[str, object] = json.loads(out)
            got["stderr"] = err.decode()
            # The successor aborted: the predecessor serves on, its socket its own.
            await until(lambda: old.state is hotswap.State.SERVING, "v1 serving again")
            assert old_sock.fileno() != -1
            got["launcher"] = launcher.getsockname()[1]
            return got
        finally:
            launcher.close()
            await old.close()

    got = asyncio.run(asyncio.wait_for(main(), 60))
    assert got.get("role") == "takeover", got
    assert got.get("port") == got["launcher"], got
    if launched == "moved":
        assert (got["http"], got["fd 3 kept"]) == (3, True), got
    else:
        assert got["http"] != 3 and got["fd 3 kept"] is False, got


def test_systemd_sockets_only_for_our_pid() -> None:
    assert systemd_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1"}, os.getpid()) == {}
    assert systemd_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"},
                           os.getpid()) == {}


def free_port() -> int:
    """A port free on 127.0.0.1 a moment ago (callers retry on a race)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def two_versions(name: str) -> tuple[hotswap.Upgrader, hotswap.Upgrader]:
    """Versions v1 and v2 of ``name``, for a handover within this process:
    no environment read, timeouts short enough for a test."""
    def options() -> hotswap.Options:
        return hotswap.Options(env={}, message_timeout=2.0, handover_timeout=5.0)

    return (hotswap.Upgrader(name, version="v1", options=options()),
            hotswap.Upgrader(name, version="v2", options=options()))


def test_successor_inherits_a_listener_asked_for_by_host_name() -> None:
    """The reviewer's failure: both versions ask for ("localhost", P). The
    predecessor's socket is bound to 127.0.0.1:P; a successor that compared
    "localhost:P" with it as text closed it and bound again, and got
    EADDRINUSE (the predecessor still holds the port): every upgrade failed.
    The successor must get the very socket the predecessor had."""
    name = f"l-{uuid.uuid4().hex[:12]}"

    async def main() -> None:
        old, new = two_versions(name)
        try:
            assert await old.start() is hotswap.Role.FRESH
            for attempt in range(20):
                port = free_port()
                try:
                    old_sock = old.listen("http", ("localhost", port))
                    break
                except ListenerError:  # someone took the port meanwhile
                    if attempt == 19:
                        raise
            await old.ready()
            assert old.status().listeners[0].address == f"127.0.0.1:{port}"
            assert await new.start() is hotswap.Role.TAKEOVER
            new_sock = new.listen("http", ("localhost", port))
            # The same kernel socket, received over the control socket.
            assert os.fstat(new_sock.fileno()).st_ino == os.fstat(old_sock.fileno()).st_ino
            ready = asyncio.create_task(new.ready())
            assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
            await old.release()
            await ready
            assert [i.address for i in new.status().listeners] == [f"127.0.0.1:{port}"]
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # still listening, now in the successor's hands
        finally:
            await old.close(cut=0)
            await new.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def listen_queue(sock: socket.socket) -> int:
    """The accept queue's length a TCP listening socket was given, as the
    kernel reports it (``tcpi_sacked`` of a listener, what ``ss`` shows)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int.from_bytes(info[28:32], sys.byteorder)


def test_an_inherited_listener_gets_the_queue_its_successor_asks_for() -> None:
    """listen(..., backlog=N) on a listener inherited from the predecessor
    listens again with N, as a fresh bind would: it used to keep the queue
    of whichever version bound it first, for good, whatever each new
    version asked for (one that accepts itself, rather than through an
    asyncio server listening again, never got a bigger queue)."""
    name = f"l-{uuid.uuid4().hex[:12]}"

    async def main() -> None:
        old, new = two_versions(name)
        try:
            assert await old.start() is hotswap.Role.FRESH
            old_sock = old.listen("raw", ("127.0.0.1", 0), backlog=4)
            assert listen_queue(old_sock) == 4
            await old.ready()
            assert await new.start() is hotswap.Role.TAKEOVER
            new_sock = new.listen("raw", ("127.0.0.1", 0), backlog=64)
            assert os.fstat(new_sock.fileno()).st_ino == os.fstat(old_sock.fileno()).st_ino
            assert listen_queue(new_sock) == 4  # the predecessor's until confirmed
            ready = asyncio.create_task(new.ready())
            assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
            assert listen_queue(new_sock) == 64
            await old.release()
            await ready
            with socket.create_connection(new_sock.getsockname(), timeout=5):
                conn, _ = new_sock.accept()  # queued already: the handshake is over
                conn.close()
        finally:
            await old.close(cut=0)
            await new.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_two_names_for_one_address_say_which_listener_holds_it(tmp_path: Path) -> None:
    """A second listen() at the address of a listener this process has
    already is refused naming that listener, before anything is bound.
    It used to bind and blame "another program" (EADDRINUSE), and for a
    Unix path its stale-socket probe first queued an empty connection on
    the first listener, which its server then accepted."""
    name = f"l-{uuid.uuid4().hex[:12]}"
    path = str(tmp_path / "api.sock")

    async def main() -> None:
        upg = hotswap.Upgrader(name, options=hotswap.Options(env={}))
        try:
            assert await upg.start() is hotswap.Role.FRESH
            unix = upg.listen("api", path)
            tcp = upg.listen("http", ("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            for other, address in (("api2", path), ("http2", ("127.0.0.1", port)),
                                   ("http3", ("localhost", port))):
                with pytest.raises(ListenerError, match="listener 'api' of this process"
                                   if other == "api2" else "listener 'http' of this process"):
                    upg.listen(other, address)
            with pytest.raises(BlockingIOError):
                unix.accept()  # nothing queued by a probe
            assert upg.listen("more", ("127.0.0.1", 0)).getsockname()[1] != port
            assert [i.name for i in upg.status().listeners] == ["api", "http", "more"]
        finally:
            await upg.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_listener_whose_kind_changed_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """A successor asking for a stream listener where its predecessor had a
    datagram one of that name and address binds anew (a TCP and a UDP port
    are two) and the inherited one is dropped: the warning says which
    kinds differ. It said "inherited dns is 127.0.0.1:P, asked for
    127.0.0.1:P", the same address twice."""
    name = f"l-{uuid.uuid4().hex[:12]}"

    # The UDP port's number is not reserved for TCP: on a busy machine a
    # connection's local port can be it (Address already in use, seen in a
    # full run). Hold a TCP bind on the number (SO_REUSEADDR, not
    # listening: connect() and port 0 pass it by, the successor's
    # SO_REUSEADDR bind does not) from before the UDP bind to the end.
    reserve = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserve.bind(("127.0.0.1", 0))
    port = reserve.getsockname()[1]

    async def main() -> None:
        old, new = two_versions(name)
        try:
            assert await old.start() is hotswap.Role.FRESH
            old.listen("dns", ("127.0.0.1", port), kind="dgram")
            await old.ready()
            assert await new.start() is hotswap.Role.TAKEOVER
            with caplog.at_level("WARNING", logger="hotswap"):
                new.listen("dns", ("127.0.0.1", port), kind="stream")
            said = [r.getMessage() for r in caplog.records if "inherited dns" in r.getMessage()]
            assert said == [f"{name}: inherited dns is dgram 127.0.0.1:{port}, asked for "
                            f"stream 127.0.0.1:{port}: binding anew"], caplog.text
        finally:
            await old.close(cut=0)
            await new.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        reserve.close()


@pytest.mark.parametrize("backlog", ["1024", 2**40, 1.5])
def test_a_backlog_that_is_no_listen_queue_is_refused_at_listen(backlog: object) -> None:
    """A backlog that ``sock.listen()`` does not take (a string read from
    the environment, a number too big for it): a listener bound anew
    failed at listen() (a ListenerError), but an inherited one in a
    takeover took it, and the confirmation then failed on it, a TypeError
    or OverflowError logged as "confirming the handover failed", and every
    later ready() raised it again. listen() now refuses it at once, in
    either case, before anything is bound or inherited; the takeover goes
    on with a listen() that gives a good one."""
    name = f"l-{uuid.uuid4().hex[:12]}"

    async def main() -> None:
        old, new = two_versions(name)
        try:
            assert await old.start() is hotswap.Role.FRESH
            with pytest.raises(ListenerError, match="backlog"):
                old.listen("raw", ("127.0.0.1", 0), backlog=backlog)  # type: ignore[arg-type]
            old_sock = old.listen("raw", ("127.0.0.1", 0), backlog=256)
            await old.ready()
            assert await new.start() is hotswap.Role.TAKEOVER
            address = old_sock.getsockname()
            with pytest.raises(ListenerError, match="backlog"):
                new.listen("raw", address, backlog=backlog)  # type: ignore[arg-type]
            new_sock = new.listen("raw", address, backlog=64)  # still inherited
            assert os.fstat(new_sock.fileno()).st_ino == os.fstat(old_sock.fileno()).st_ino
            ready = asyncio.create_task(new.ready())
            assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
            await old.release()
            await ready
            assert listen_queue(new_sock) == 64
        finally:
            await old.close(cut=0)
            await new.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_failed_handover_leaves_the_predecessor_its_queue() -> None:
    """The listen queue a successor asks for is the shared listener's from
    the step that confirms on: one that backs out before (here it closes,
    its set-up failed, say) leaves the predecessor the queue it had. It
    took effect at listen(), and a successor asking for 4 left the old
    version, serving on, a 4-connection queue for good (guarantee 3)."""
    name = f"l-{uuid.uuid4().hex[:12]}"

    async def main() -> None:
        old, new = two_versions(name)
        try:
            assert await old.start() is hotswap.Role.FRESH
            old_sock = old.listen("raw", ("127.0.0.1", 0), backlog=256)
            await old.ready()
            assert await new.start() is hotswap.Role.TAKEOVER
            new.listen("raw", ("127.0.0.1", 0), backlog=4)
            await new.close()  # before ready(): the handover is aborted
            assert listen_queue(old_sock) == 256
        finally:
            await old.close(cut=0)
            await new.close()

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("started", ["by-ready", "before-ready"])
def test_a_successors_server_sets_the_queue_as_on_a_fresh_start(started: str) -> None:
    """A server of backlog 32 on the listener: its queue, on a fresh start
    and in a takeover alike.
    - by-ready: listen(..., backlog=64), the server started by ready():
      listen()'s takes effect as the successor confirms, before its servers
      listen again, not after them;
    - before-ready: listen() with no backlog, the server started at once
      (the way before ``ready(start_serving=...)``): listen()'s default
      (1,024) was applied to the inherited listener as the successor
      confirmed, over the queue that server had set (the late review's
      finding)."""
    name = f"l-{uuid.uuid4().hex[:12]}"
    by_ready = started == "by-ready"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def serve(upgrader: hotswap.Upgrader) -> tuple[socket.socket, asyncio.Server]:
        sock = upgrader.listen("raw", ("127.0.0.1", 0), backlog=64 if by_ready else None)
        server = await asyncio.start_server(answer, sock=sock, backlog=32,
                                            start_serving=not by_ready)
        return sock, server

    async def main() -> None:
        old, new = two_versions(name)
        servers: list[asyncio.Server] = []
        try:
            assert await old.start() is hotswap.Role.FRESH
            old_sock, server = await serve(old)
            servers.append(server)
            await old.ready(start_serving=[server] if by_ready else ())
            assert listen_queue(old_sock) == 32
            assert await new.start() is hotswap.Role.TAKEOVER
            new_sock, server = await serve(new)
            servers.append(server)
            ready = asyncio.create_task(new.ready(start_serving=[server] if by_ready else ()))
            assert await old.wait_exit() is hotswap.ExitReason.TAKEN_OVER
            servers[0].close()
            await old.release()
            await ready
            assert listen_queue(new_sock) == 32
        finally:
            for server in servers:
                server.close()
            await old.close(cut=0)
            await new.close()

    asyncio.run(asyncio.wait_for(main(), 60))


UDP_SERVER = ROOT / "tests/support/udp_server.py"


def udp_server(procs: Procs, name: str, version: str, port: int = 0
               ) -> tuple[subprocess.Popen[bytes], Path]:
    proc = procs.spawn(version, [PY, str(UDP_SERVER), "--name", name, "--version", version,
                                 "--port", str(port)])
    return proc, procs.procs[-1][2]


def udp_ready(proc: subprocess.Popen[bytes], log: Path) -> int:
    """The port of a UDP server once it says READY (fails if it exits first)."""
    def ready() -> int | None:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("READY "):
                return int(line.split()[1])
        assert proc.poll() is None, f"exited with {proc.returncode}"
        return None
    port: int = wait_for(ready, 30, "the UDP server's READY")
    return port


class UdpClient:
    """Numbered datagrams with at most ``window`` unanswered at once (so that
    no socket buffer overflows however slowly the servers run), each answer
    counted by who gave it."""

    def __init__(self, port: int, window: int = 32) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.connect(("127.0.0.1", port))
        self.window = window
        self.sent = 0
        self.answers: dict[int, list[bytes]] = {}

    def _read(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(100)
        except TimeoutError:
            return False
        version, _, number = data.partition(b":")
        self.answers.setdefault(int(number), []).append(version)
        return True

    def unanswered(self) -> int:
        return self.sent - len(self.answers)

    def exchange(self, until: subprocess.Popen[bytes] | None = None,
                 count: int = 0) -> None:
        """Send while ``until`` runs (or ``count`` more), then collect every
        answer; fails if none came for 10 s while some were missing."""
        goal = self.sent + count
        while (until is not None and until.poll() is None) or self.sent < goal:
            if self.unanswered() < self.window:
                self.sock.send(str(self.sent).encode())
                self.sent += 1
            else:
                assert self._read(10), f"no answer for 10 s, {self.unanswered()} missing"
        while self.unanswered():
            assert self._read(10), f"no answer for 10 s, {self.unanswered()} missing"

    def close(self) -> None:
        self.sock.close()


def test_udp_datagrams_are_each_answered_once_across_a_handover(procs: Procs,
                                                                  name: str) -> None:
    """A UDP listener changes hands like a TCP one: both versions read the
    one kernel socket until the old one stops, so every datagram, those
    queued when it stops included, is answered once, by one of them."""
    v1, v1_log = udp_server(procs, name, "v1")
    port = udp_ready(v1, v1_log)
    client = UdpClient(port)
    try:
        client.exchange(count=200)
        v2, v2_log = udp_server(procs, name, "v2")
        client.exchange(until=v1)  # until v1 has handed over and stopped
        assert v1.wait(timeout=10) == 0, procs.logs()
        client.exchange(count=200)
    finally:
        client.close()
    by = client.answers
    assert sorted(by) == list(range(client.sent))  # none lost
    assert not {n: versions for n, versions in by.items() if len(versions) > 1}
    assert all(by[n] == [b"v1"] for n in range(200))
    assert all(by[n] == [b"v2"] for n in range(client.sent - 200, client.sent))
    assert udp_ready(v2, v2_log) == port


def test_a_udp_port_in_use_is_refused_not_shared(procs: Procs, name: str) -> None:
    """A second, unrelated start on the UDP port a serving version holds
    (another name: nothing to take over) fails with EADDRINUSE, as it does
    for TCP. It used to bind beside it (SO_REUSEADDR lets UDP sockets share
    a port on Linux) and take every datagram from the serving version, whose
    queue it would lose when either stopped."""
    v1, v1_log = udp_server(procs, name, "v1")
    port = udp_ready(v1, v1_log)
    other, other_log = udp_server(procs, name + "-other", "other", port)

    def settled() -> bool:
        return other.poll() is not None or "READY" in other_log.read_text(errors="replace")
    wait_for(settled, 30, "the second start to bind or fail")
    assert "READY" not in other_log.read_text(errors="replace"), \
        "a second server bound the serving UDP port"
    assert other.wait(timeout=10) != 0
    assert "Address already in use" in other_log.read_text(errors="replace")
    client = UdpClient(port)
    try:
        client.exchange(count=100)
    finally:
        client.close()
    assert all(versions == [b"v1"] for versions in client.answers.values())
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=10) == 0
