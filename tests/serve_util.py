"""Starting `gemmalens serve` in a subprocess for the tests: a free port on 127.0.0.1, wait for /health, always stop."""
import os
import socket
import subprocess
import sys
import time

import httpx


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m gemmalens serve ARGS --port P` on 127.0.0.1; .url, .pid, .health(); stop() ends it."""

    def __init__(self, args, log_path, api_key=None, timeout=180):
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "gemmalens", "serve", "--port", str(self.port)] + list(args)
        if api_key:
            cmd += ["--api-key", api_key]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))
        self.pid = self.proc.pid
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"gemmalens serve exited ({self.proc.returncode}):\n{open(log_path).read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"gemmalens serve did not answer /health in {timeout} s:\n{open(log_path).read()[-3000:]}")
            time.sleep(0.1)

    def headers(self):
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self):
        return httpx.get(self.url + "/health", timeout=10).json()

    def post(self, path, body, **kw):
        return httpx.post(self.url + path, json=body, headers=self.headers(), timeout=kw.pop("timeout", 60), **kw)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=120)

    def rss(self):
        """The server process's resident set size in bytes (Linux /proc)."""
        for line in open(f"/proc/{self.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
