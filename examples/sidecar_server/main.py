"""Sample sidecar: an aiohttp + uvloop server that hotswap can upgrade in place.

    python examples/sidecar_server/main.py --version v1 --port 9091 --name sidecar

``GET /serve`` answers ``This is version(v1) sidecar``. Start a second copy
with ``--version v2`` (and, the Kruise way, ``SIDECARSET_VERSION=2
SIDECARSET_VERSION_ALT=1``) and it takes the listening socket from the first,
which stops accepting, drains and steps aside; no request fails.

It uses only hotswap's public API: :class:`hotswap.Upgrader` and
:func:`hotswap.aiohttp.serve`. Every flag has an environment fallback
(``SIDECAR_VERSION``, ``SIDECAR_PORT``, ``SIDECAR_HOST``, ``HOTSWAP_NAME``,
``HOTSWAP_CONTROL_PATH``, ``HOTSWAP_DRAIN_TIMEOUT``, ``HOTSWAP_HANDOVER_TIMEOUT``,
``SIDECAR_DELAY``, ``HOTSWAP_MIGRATE=0`` (or ``false``, ``no``, ``off``) for
``--no-migrate``,
``SIDECAR_FAIL_START``, ``SIDECAR_TLS_CERT`` and ``SIDECAR_TLS_KEY``), which is
how the container images configure it; the upgrader itself reads
``HOTSWAP_ALLOW_UIDS`` (more uids allowed on the control socket) and the
Kruise versions. The app itself
is in ``app.py`` next to this file (imported from the script's directory, so
copy both), free of hotswap: bench/plain_server.py serves the same one without.
"""

from __future__ import annotations

import sys

import hotswap.startup

# PID 1 in its container: a SIGTERM before serve() installs its handlers
# (during the imports and the set-up below) would be dropped, and the
# kubelet would wait out its grace period. It ends the process instead.
hotswap.startup.exit_on_sigterm()

# Taking over from a serving predecessor: load the modules at idle CPU
# priority (first thing, even the standard library's) so that the version
# still serving does not feel this start-up. A HOTSWAP_IDLE_START that is
# no switch is a usage error, as a malformed flag (it was a traceback).
try:
    _IDLE = hotswap.startup.should_idle()
except ValueError as exc:
    print(f"{sys.argv[0]}: error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
IDLE_START = hotswap.startup.preload("argparse", "asyncio", "logging", "signal", "uvloop",
                                     "aiohttp.web", "hotswap.aiohttp", "app", idle=_IDLE)

import argparse  # noqa: E402 -- loaded above
import asyncio  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

import uvloop  # noqa: E402
from aiohttp import web  # noqa: E402
from app import exit_now, make_app  # noqa: E402 -- app.py, next to this file

import hotswap  # noqa: E402
import hotswap.aiohttp  # noqa: E402


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more. Anything
    else is a usage error here, not a failure once the sockets are taken
    (``--delay nan`` answered every request 500, ``inf`` never)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"not a finite number of seconds, 0 or more: {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    # String defaults from the environment go through `type` too: a malformed
    # one is a usage error (exit 2) like the same value given as a flag.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=env.get("SIDECAR_VERSION", "v1"))
    # Empty (or blank) is unset, as SIDECAR_FAIL_START's and HOTSWAP_MIGRATE's
    # are: "" would bind every interface.
    parser.add_argument("--host", default=env.get("SIDECAR_HOST", "").strip() or "127.0.0.1")
    parser.add_argument("--port", type=int, default=env.get("SIDECAR_PORT", "9091"))
    parser.add_argument("--name", default=env.get("HOTSWAP_NAME", "sidecar"))
    parser.add_argument("--control-path", default=env.get("HOTSWAP_CONTROL_PATH"))
    parser.add_argument("--drain-timeout", type=seconds,
                        default=env.get("HOTSWAP_DRAIN_TIMEOUT",
                                        str(hotswap.aiohttp.DEFAULT_DRAIN_TIMEOUT)))
    parser.add_argument("--handover-timeout", type=seconds,
                        default=env.get("HOTSWAP_HANDOVER_TIMEOUT", "30"))
    parser.add_argument("--delay", type=seconds, default=env.get("SIDECAR_DELAY", "0"),
                        help="seconds each request takes (to show in-flight draining)")
    # HOTSWAP_MIGRATE as hotswap reads HOTSWAP_IDLE_START: anything but these
    # words is refused, not taken for "migrate" (HOTSWAP_MIGRATE=false did).
    migrate = env.get("HOTSWAP_MIGRATE", "").strip().lower()
    parser.add_argument("--no-migrate", action="store_true",
                        default=migrate in ("0", "false", "no", "off"),
                        help="do not hand idle keep-alive connections to the successor "
                             "(they drain with Connection: close instead)")
    parser.add_argument("--fail-start", choices=("kill", "hang"),
                        default=env.get("SIDECAR_FAIL_START") or None,
                        help="after taking the sockets and before confirming, "
                             "SIGKILL itself or hang until SIGTERM (to show a "
                             "failed migration)")
    parser.add_argument("--tls-cert", default=env.get("SIDECAR_TLS_CERT"),
                        help="serve HTTPS with this certificate chain (PEM); TLS "
                             "connections drain the safe way instead of moving")
    parser.add_argument("--tls-key", default=env.get("SIDECAR_TLS_KEY"),
                        help="its private key (PEM; default: in the --tls-cert file)")
    args = parser.parse_args(argv)
    if migrate not in ("", "1", "true", "yes", "on", "0", "false", "no", "off"):
        parser.error(f"HOTSWAP_MIGRATE={env['HOTSWAP_MIGRATE']!r}: use 1 or 0")
    # argparse checks `choices` only on what the command line gives: a
    # SIDECAR_FAIL_START it does not know (KILL, a typo) hung every start.
    if args.fail_start not in (None, "kill", "hang"):
        parser.error(f"SIDECAR_FAIL_START={args.fail_start!r}: use kill or hang")
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    if not args.handover_timeout:
        parser.error("argument --handover-timeout: must be more than 0 seconds")
    return args


async def run(args: argparse.Namespace, app: web.Application) -> int:
    try:
        options = hotswap.Options(control_path=args.control_path,
                                  handover_timeout=args.handover_timeout)
        upgrader = hotswap.Upgrader(args.name, version=args.version, options=options)
    except ValueError as exc:  # a --name or --control-path that is no socket address
        logging.error("%s", exc)
        return 1
    if args.fail_start:
        @app.on_startup.append
        async def fail(_: web.Application) -> None:
            if args.fail_start == "kill":
                logging.error("--fail-start kill: SIGKILL before confirming")
                os.kill(os.getpid(), signal.SIGKILL)
            logging.error("--fail-start hang: not confirming until SIGTERM")
            await upgrader.wait_exit()
    return await hotswap.aiohttp.serve(app, upgrader, {"http": (args.host, args.port)},
                                       drain_timeout=args.drain_timeout,
                                       migrate_connections=not args.no_migrate,
                                       ssl_context=args.tls)


def prepare() -> tuple[argparse.Namespace, web.Application, asyncio.AbstractEventLoop]:
    """The set-up that needs no running event loop: ~2 ms of CPU (argparse's
    first regular expressions, logging, the TLS context if any, the app, the loop) that would
    otherwise run at normal priority right before the handover, on cores the
    old version is serving from."""
    args = parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.version} pid={os.getpid()} "
                               "%(levelname)s %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if IDLE_START:
        logging.info("taking over: start-up modules were loaded at idle CPU priority")
    args.tls = None
    if args.tls_cert:  # a bad file fails here, before anything is taken over
        import ssl  # aiohttp has imported it already
        args.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            args.tls.load_cert_chain(args.tls_cert, args.tls_key)
        except OSError as exc:  # ssl.SSLError too; a missing file's says not which
            logging.error("cannot load --tls-cert %r%s: %s", args.tls_cert,
                          f" --tls-key {args.tls_key!r}" if args.tls_key else "", exc)
            raise SystemExit(1) from None
    return args, make_app(args.version, args.delay), uvloop.new_event_loop()


def main() -> None:
    args, app, loop = hotswap.startup.idle_call(prepare, idle=IDLE_START)
    try:
        code = asyncio.Runner(loop_factory=lambda: loop).run(run(args, app))
    except hotswap.HotswapError as exc:  # says what and why; no traceback needed
        logging.error("%s: %s", type(exc).__name__, exc)
        code = 1
    exit_now(code)  # serve() has closed every socket


if __name__ == "__main__":
    main()
