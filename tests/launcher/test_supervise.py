"""launcher/supervise.py's readiness poll: a plain-socket GET (no urllib in the process that waits for the
server all its life), against a real loopback HTTP server."""
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from launcher.supervise import http_get
from tests.launcher.loopback_http import JSONHandler, serve

REPO = Path(__file__).resolve().parents[2]


class _Handler(JSONHandler):
    protocol_version = "HTTP/1.1"   # keep-alive by default: the client's Connection: close must end it
    answers = [(503, {"status": "starting", "phase": "loading weights"}), (200, {"status": "ready"})]

    def do_GET(self):
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.answer(status, {**body, "path": self.path})


@pytest.fixture
def server():
    httpd, _ = serve(_Handler)
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_http_get_reads_status_and_body(server):
    status, body = http_get("127.0.0.1", server, "/health/ready", timeout=5)
    assert status == 503 and json.loads(body) == {"status": "starting", "phase": "loading weights",
                                                  "path": "/health/ready"}
    status, body = http_get("127.0.0.1", server, "/health/ready", timeout=5)
    assert status == 200 and json.loads(body)["status"] == "ready"


def test_http_get_without_a_server_is_an_os_error():
    with socket.socket() as sock:   # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OSError):
        http_get("127.0.0.1", port, "/health/ready", timeout=2)


def test_http_get_rejects_a_non_http_answer():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer():
            conn, _ = listener.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")

        thread = threading.Thread(target=answer)
        thread.start()
        with pytest.raises(ValueError):
            http_get("127.0.0.1", port, "/health/ready", timeout=5)
        thread.join()


def test_the_supervisor_imports_no_urllib_or_torch(tmp_path, default_gguf_path):
    """What `llm serve` keeps in memory while the server runs: the profile, the launch spec, no HTTP client."""
    profile = tmp_path / "p.toml"
    profile.write_text(f'[model]\nsource = "{default_gguf_path}"\n[engine]\ndevice = "cpu"\n')
    script = (f"import sys, launcher.supervise as s\nfrom launcher.profile import load_profile\n"
              f"assert s.prepare_launch(load_profile({str(profile)!r})) is not None\n"
              "heavy = sorted(m for m in sys.modules if m in ('urllib.request', 'http.client') or m.split('.')[0] "
              "in ('ssl', 'email', 'torch', 'numpy'))\nassert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
