"""The busybox client (examples/busybox_client/main.py) is what proves that
no request failed: every kind of failure must count, and make it exit 1."""

from __future__ import annotations

import http.server
import itertools
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PY, ROOT, child_env

CLIENT = ROOT / "examples/busybox_client/main.py"


def body(version: str) -> str:
    return f"This is version({version}) sidecar"


@pytest.fixture
def stub() -> Iterator[tuple[int, list[str]]]:
    """An HTTP/1.1 keep-alive server on 127.0.0.1 answering 200 with the
    bodies the test puts in the list, in turn (the last one repeats)."""
    bodies: list[str] = []
    counter = itertools.count()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            data = bodies[min(next(counter), len(bodies) - 1)].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_client(port: int, tmp_path: Path, duration: float = 0.5
               ) -> tuple[int, dict[str, Any], str]:
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        [PY, str(CLIENT), "--url", f"http://127.0.0.1:{port}/serve", "--interval", "0.02",
         "--duration", str(duration), "--summary-json", str(summary)],
        env=child_env(), capture_output=True, text=True, timeout=30)
    return result.returncode, json.loads(summary.read_text()), result.stdout


def test_versions_moving_forward_pass(stub: tuple[int, list[str]], tmp_path: Path) -> None:
    port, bodies = stub
    bodies += [body("v1"), body("v1"), body("v2"), body("v3")]
    code, summary, out = run_client(port, tmp_path)
    assert code == 0, out
    assert summary["failed"] == 0
    assert summary["version_order"] == ["v1", "v2", "v3"]


def test_a_wrong_body_is_a_failure(stub: tuple[int, list[str]], tmp_path: Path) -> None:
    port, bodies = stub
    bodies += [body("v1"), "502: upstream gone", body("v1")]
    code, summary, out = run_client(port, tmp_path)
    assert code == 1, out
    assert summary["failed"] == 1
    assert summary["errors"] == {"WrongBody": 1}


def test_a_version_going_backwards_is_a_failure(stub: tuple[int, list[str]],
                                                tmp_path: Path) -> None:
    port, bodies = stub
    bodies += [body("v1"), body("v2"), body("v1"), body("v2")]
    code, summary, out = run_client(port, tmp_path)
    assert code == 1, out
    assert summary["errors"] == {"VersionWentBack": 2}  # v1 again, then v2 again
    assert summary["version_order"] == ["v1", "v2", "v1", "v2"]


def test_no_request_at_all_proves_nothing(stub: tuple[int, list[str]],
                                         tmp_path: Path) -> None:
    port, bodies = stub
    bodies.append(body("v1"))
    code, summary, out = run_client(port, tmp_path, duration=-1)
    assert code == 1, out
    assert summary["requests"] == 0
