"""The sample sidecar (examples/sidecar_server/main.py) is what users copy
first: a configuration it cannot run with is said at once, naming the flag
or file, before it takes anything over, never found at the first request."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PY, SIDECAR, child_env, run_script


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
