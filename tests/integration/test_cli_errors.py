"""The command lines fail fast, in one line, naming the option to change, before any model loads (real
subprocesses; a stub aggregator in this process answers what each case needs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FEDERATION = {"base_model": "tiny-llama", "rank": 8, "alpha": 16.0, "shared_roles": ["attention", "generalist"],
              "min_devices": 1, "round_deadline_s": 600.0, "aggregation": "mean", "strategy": "fedavg"}


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """stderr without log lines (``HH:MM:SS LEVEL name: ...``)."""
    return [line for line in done.stderr.splitlines() if line.strip() and not line[:2].isdigit()]


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = error_lines(done)
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "loading base model" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


class Stub:
    """An aggregator stand-in: ``answers[(method, path)] = (status, body)``; records every request."""

    def __init__(self, answers: dict) -> None:
        self.answers, self.requests = answers, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                stub.requests.append((self.command, self.path))
                status, body = stub.answers.get((self.command, self.path), (404, {"error": "not_found",
                                                                                  "detail": self.path}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = Stub({("GET", "/health"): (200, {"status": "ok"}),
                   ("GET", "/status"): (200, {"ready": True, "config": FEDERATION, "devices": 0,
                                              "current_round": None, "history": []}),
                   ("POST", "/enroll"): (401, {"error": "unauthorized",
                                               "detail": "wrong enrollment secret; ask the federation's admin for it"})})
    yield server
    server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_url_without_scheme_fails_at_once(tiny_user, tmp_path):
    start = time.perf_counter()
    done = run("device_sdk", "join", "--server", "127.0.0.1:8700", "--data", str(tiny_user), "--state",
               str(tmp_path / "state"), cwd=tmp_path)
    assert_one_line_error(done, "'127.0.0.1:8700'", "http://127.0.0.1:8700")
    assert "retry" not in done.stderr and not (tmp_path / "state").exists()
    assert time.perf_counter() - start < 60


def test_a_4xx_answer_is_not_retried_and_the_model_never_loads(stub, tiny_user, tmp_path):
    done = run("device_sdk", "join", "--server", stub.url, "--data", str(tiny_user), "--state",
               str(tmp_path / "state"), "--enroll-secret", "wrong-secret", "--specialists", "1", cwd=tmp_path)
    assert_one_line_error(done, "401", "wrong enrollment secret")
    assert stub.requests.count(("POST", "/enroll")) == 1 and "retry" not in done.stderr


def test_connection_refused_is_retried_then_hints_at_the_server(tiny_user, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    done = run("device_sdk", "join", "--server", url, "--data", str(tiny_user), "--state", str(tmp_path / "s"),
               "--retries", "2", cwd=tmp_path)
    assert_one_line_error(done, "after 3 attempts", f"is the aggregator running at {url}?")
    assert done.stderr.count("retry 1 of 2") == 1 and done.stderr.count("retry 2 of 2") == 1


def test_join_takes_the_federations_settings_and_names_a_contradiction(stub, tiny_user, tmp_path):
    done = run("device_sdk", "join", "--server", stub.url, "--data", str(tiny_user), "--state", str(tmp_path / "s"),
               "--enroll-secret", "secret-123", "--strategy", "comigs-1gxs", cwd=tmp_path)
    assert_one_line_error(done, "--strategy 'comigs-1gxs'", "the federation's strategy 'fedavg'")
    assert ("POST", "/enroll") not in stub.requests  # refused before enrolling: it cannot block a round
    # without --strategy the federation's is taken: the device gets as far as enrolling (refused by the stub)
    done = run("device_sdk", "join", "--server", stub.url, "--data", str(tiny_user), "--state", str(tmp_path / "s"),
               "--enroll-secret", "secret-123", cwd=tmp_path)
    assert_one_line_error(done, "wrong enrollment secret")


def test_an_unknown_model_says_did_you_mean(tiny_user, tmp_path):
    done = run("device_sdk", "train-local", "--data", str(tiny_user), "--model", "smollm2-136m", "--out",
               str(tmp_path / "o"), cwd=tmp_path)
    assert_one_line_error(done, "'smollm2-136m'", "did you mean 'smollm2-135m'?", "tiny-llama")
    assert not (tmp_path / "o").exists()


def test_a_config_error_names_the_option(tiny_user, tmp_path):
    done = run("device_sdk", "train-local", "--data", str(tiny_user), "--model", "tiny-llama", "--router-period",
               "0", "--ctx", "0", "--out", str(tmp_path / "o"), cwd=tmp_path)
    line = assert_one_line_error(done, "--router-period must be", "--ctx must be")
    assert "router_period" not in line and "TrainConfig" not in line


def test_compile_with_the_executorch_backend_names_both_options(tiny_user, tmp_path):
    done = run("device_sdk", "join", "--server", "http://127.0.0.1:9", "--enroll-secret", "s", "--data",
               str(tiny_user), "--state", str(tmp_path / "state"), "--compile", "--backend", "executorch",
               cwd=tmp_path)
    assert_one_line_error(done, "--compile must be off with backend executorch", "backend pytorch")
    assert not (tmp_path / "state").exists()


def test_an_out_of_another_run_is_refused(tiny_user, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"command": "export", "settings": {}}))
    done = run("device_sdk", "train-local", "--data", str(tiny_user), "--model", "tiny-llama", "--out", str(out),
               cwd=tmp_path)
    assert_one_line_error(done, "output of another command (export, not train-local)", "--overwrite")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    done = run("export", "--checkpoint", str(tiny_user), "--out", str(foreign), "--overwrite", cwd=tmp_path)
    assert_one_line_error(done, "no comigs-sdk command wrote", "notes.txt")
    assert (foreign / "notes.txt").read_text() == "keep me"
