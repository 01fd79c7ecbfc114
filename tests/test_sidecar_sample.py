"""The sample sidecar (examples/sidecar_server/main.py) is what users copy
first: a configuration it cannot run with is said at once, naming the flag
or file, before it takes anything over, never found at the first request."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import PY, SIDECAR, Procs, child_env, run_script, serving, wait_for


@pytest.mark.parametrize(("args", "env", "said"), [
    (("--delay", "nan"), {}, "argument --delay: not a finite number of seconds"),
    (("--delay", "inf"), {}, "argument --delay: not a finite number of seconds"),
    ((), {"SIDECAR_DELAY": "nan"}, "argument --delay: not a finite number of seconds"),
    (("--drain-timeout", "-1"), {}, "argument --drain-timeout: not a finite number"),
    ((), {"HOTSWAP_DRAIN_TIMEOUT": "nan"}, "argument --drain-timeout: not a finite"),
    (("--handover-timeout", "0"), {}, "argument --handover-timeout: must be more than 0"),
    ((), {"HOTSWAP_HANDOVER_TIMEOUT": "-5"}, "argument --handover-timeout: not a finite"),
], ids=["delay-nan", "delay-inf", "delay-env", "drain-negative", "drain-env",
        "handover-zero", "handover-env"])
def test_a_number_of_seconds_it_cannot_use_is_a_usage_error(
        args: tuple[str, ...], env: dict[str, str], said: str, name: str) -> None:
    """``--delay nan`` started, took over, and answered every request 500
    (``inf``: never); a negative or NaN drain or handover timeout ended in a
    traceback from deep in the library. Now exit 2, naming the flag."""
    run = run_script([PY, str(SIDECAR), "--name", name, "--port", "0", *args],
                     child_env(**env), timeout=30)
    assert run.returncode == 2, run
    assert said in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("which", ["missing", "not-pem"])
def test_a_certificate_it_cannot_load_is_named(which: str, name: str,
                                               tmp_path: Path) -> None:
    """A missing certificate file ended in a traceback saying only "No such
    file or directory" (which one: the certificate or its key?)."""
    cert = tmp_path / "tls.pem"
    if which == "not-pem":
        cert.write_text("not a certificate\n")
    run = run_script([PY, str(SIDECAR), "--name", name, "--port", "0",
                      "--tls-cert", str(cert)], child_env(), timeout=30)
    assert run.returncode == 1, run
    assert f"ERROR cannot load --tls-cert {str(cert)!r}" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_a_name_that_is_no_socket_address_is_said_in_one_line(name: str) -> None:
    run = run_script([PY, str(SIDECAR), "--name", f"{name}/x", "--port", "0"],
                     child_env(), timeout=30)
    assert run.returncode == 1, run
    assert f"ERROR invalid sidecar name '{name}/x'" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize(("value", "no_migrate"), [
    (None, "False"), ("1", "False"), ("on", "False"), ("0", "True"), ("false", "True"),
    ("No", "True"), ("off", "True"), ("nope", None), (" off\n", "True"), ("1\n", "False")])
def test_hotswap_migrate_is_read_as_hotswap_reads_its_switches(
        value: str | None, no_migrate: str | None) -> None:
    """``HOTSWAP_MIGRATE=false`` (or ``no``, ``off``: the words hotswap takes
    for ``HOTSWAP_IDLE_START``) was taken for "migrate", as was any typo; only
    ``0`` turned it off. Blanks around it are dropped, as hotswap drops them
    (a ConfigMap value made ``--from-file`` ends with a newline). Read as the
    sample reads it (its parse_args)."""
    probe = (f"import sys; sys.path.insert(0, {str(SIDECAR.parent)!r})\n"
             "import main\n"
             "print(main.parse_args([]).no_migrate)\n")
    env = child_env() if value is None else child_env(HOTSWAP_MIGRATE=value)
    run = run_script([PY, "-c", probe], env, timeout=30)
    if no_migrate is None:
        assert run.returncode == 2, run
        assert f"HOTSWAP_MIGRATE={value!r}: use 1 or 0" in run.stderr, run.stderr
    else:
        assert run.returncode == 0 and run.stdout == f"{no_migrate}\n", run


@pytest.mark.parametrize(("value", "host"), [
    (None, "127.0.0.1"), ("", "127.0.0.1"), (" \n", "127.0.0.1"), ("0.0.0.0", "0.0.0.0"),
    ("::1", "::1")])
def test_an_empty_sidecar_host_is_the_default_not_every_interface(
        value: str | None, host: str) -> None:
    """``SIDECAR_HOST=`` (a manifest's empty value) made the sample listen on
    every interface (Python binds "" to all of them) instead of its
    127.0.0.1; an empty value is unset, as an empty SIDECAR_FAIL_START or
    HOTSWAP_MIGRATE is. Read as the sample reads it (its parse_args)."""
    probe = (f"import sys; sys.path.insert(0, {str(SIDECAR.parent)!r})\n"
             "import main\n"
             "print(main.parse_args([]).host)\n")
    env = child_env() if value is None else child_env(SIDECAR_HOST=value)
    run = run_script([PY, "-c", probe], env, timeout=30)
    assert run.returncode == 0 and run.stdout == f"{host}\n", run


@pytest.mark.parametrize("value", ["KILL", "hang ", "bogus"])
def test_a_fail_start_it_does_not_know_is_a_usage_error(value: str, name: str) -> None:
    """argparse checks ``choices`` on the command line only, not on a
    default taken from the environment: ``SIDECAR_FAIL_START=KILL`` (which
    ``--fail-start KILL`` refuses) was taken for ``hang``, and every start
    hung before confirming until a SIGTERM. Now exit 2, naming it."""
    run = run_script([PY, str(SIDECAR), "--name", name, "--port", "0"],
                     child_env(SIDECAR_FAIL_START=value), timeout=30)
    assert run.returncode == 2, run
    assert f"SIDECAR_FAIL_START={value!r}: use kill or hang" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_an_idle_start_switch_it_cannot_read_is_a_usage_error(value: str, name: str) -> None:
    """``HOTSWAP_IDLE_START=maybe`` ended the start in a traceback from
    ``preload()`` (exit 1), where ``HOTSWAP_MIGRATE=maybe`` and any
    malformed flag are one line and exit 2."""
    run = run_script([PY, str(SIDECAR), "--name", name, "--port", "0"],
                     child_env(HOTSWAP_IDLE_START=value), timeout=30)
    assert run.returncode == 2, run
    assert f"error: HOTSWAP_IDLE_START={value!r}: use 1 or 0" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_a_closed_stdout_does_not_change_the_exit_status(procs: Procs, name: str) -> None:
    """Started with its stdout closed (``>&-``: Python's ``sys.stdout`` is
    then None), the sample served and drained, then its last step, flushing
    stdout before ``os._exit``, raised AttributeError: a traceback and exit 1
    instead of serve()'s 0, and the interpreter teardown it skips ran."""
    v1 = procs.spawn("v1", ["sh", "-c", 'exec "$0" "$@" >&-', PY, str(SIDECAR),
                            "--name", name, "--version", "v1", "--port", "0"])
    wait_for(serving(name, "v1"), 15, "v1 serving")
    v1.send_signal(signal.SIGTERM)
    assert v1.wait(timeout=30) == 0, procs.logs()
    assert "Traceback" not in procs.logs(), procs.logs()
