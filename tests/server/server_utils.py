"""Helpers of the server tests: a real `engine serve` subprocess, and the error-shape check."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

import engine

# the subprocess imports engine from where this process did (the tree, or site-packages)
ENGINE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
MODEL = "smollm2"
EMBEDDING_MODEL = "minilm"  # all-MiniLM-L6-v2, as the embedding tests serve it
# small context: the context-window errors are cheap to reach; 2048 KV tokens
ENGINE_ARGS = ["--max-model-len", "512", "--num-kv-blocks", "128"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`engine serve` on 127.0.0.1:<free port>; stderr and the access log go to files.

    Args:
        model_path: the model to serve (as "smollm2").
        data_dir: the server's data directory.
        args: more `engine serve` arguments.
        served_name: the name clients send as "model".
        engine_args: the engine options (default: the small generation setup).
    """

    def __init__(self, model_path: str, data_dir, *args: str, served_name: str = MODEL,
                 engine_args: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = str(data_dir)
        os.makedirs(self.data_dir, exist_ok=True)
        self.access_log = os.path.join(self.data_dir, f"access-{self.port}.log")
        self.stderr_path = os.path.join(self.data_dir, f"stderr-{self.port}.log")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([ENGINE_PARENT, env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "engine.cli", "serve", model_path, "--port", str(self.port),
               "--served-model-name", served_name, "--data-dir", self.data_dir,
               "--access-log", self.access_log,
               *(ENGINE_ARGS if engine_args is None else engine_args), *args]
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.stderr()}")

    def stderr(self) -> str:
        with open(self.stderr_path) as f:
            return f.read()

    def access_lines(self) -> list[dict]:
        with open(self.access_log) as f:
            return [json.loads(line) for line in f if line.strip()]

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return self.proc.returncode


API_KEY = "test-static-key-0123456789"


def error_of(response: httpx.Response) -> dict:
    """The error object of a response, checked to be in OpenAI's shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error
