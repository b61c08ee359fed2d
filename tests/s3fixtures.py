"""A real S3 endpoint for tests: moto's server on 127.0.0.1, started and stopped by pid,
plus a fault-injecting HTTP proxy in front of it for transient-error tests."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orchestrator.core.storage import StorageOptions

SECRET = "s3cr3t-" + uuid.uuid4().hex  # distinctive, so leaks are easy to find
ACCESS_KEY = "AKIA" + uuid.uuid4().hex[:16].upper()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_endpoint():
    """http://127.0.0.1:PORT of a moto server (or FLOWPP_TEST_S3_ENDPOINT if CI started one)."""
    given = os.environ.get("FLOWPP_TEST_S3_ENDPOINT")
    if given:
        yield given
        return
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class S3:
    endpoint: str
    bucket: str
    options: StorageOptions

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def s3(s3_endpoint, aws_env):
    """A fresh bucket on the moto server; credentials only in the environment."""
    bucket = "test-" + uuid.uuid4().hex[:12]
    ctx = S3(s3_endpoint, bucket, StorageOptions(endpoint_url=s3_endpoint, backoff_s=0.01, max_attempts=3))
    ctx.client().create_bucket(Bucket=bucket)
    return ctx


class FaultProxy:
    """Forwards HTTP to ``target``; the first ``failures`` requests (GETs, or ``methods``) whose path
    contains ``match`` get ``mode``: ``503`` (SlowDown), ``500``, ``reset`` (connection dropped), or
    ``slow`` (forwarded after ``delay_s``: a distant or loaded endpoint; ``failures=-1``: every one).
    With ``strip_conditions`` it drops the conditional headers of every request it forwards."""

    def __init__(self, target: str, match: str, failures: int, mode: str = "503", methods: tuple = ("GET",),
                 strip_conditions: bool = False, delay_s: float = 0.0):  # fmt: skip
        self.target = target.split("://", 1)[1]
        self.strip_conditions = strip_conditions  # a store that ignores If-Match and If-None-Match
        self.methods = methods
        self.match, self.remaining, self.mode, self.delay_s = match, failures, mode, delay_s
        self.injected = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b""  # HTTP chunks (the AWS C++ SDK streams a part's aws-chunked body this way)
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return body
                    body += self.rfile.read(size)
                    self.rfile.readline()

            def _forward(self):
                body = self._body()
                if self.command in proxy.methods and proxy.match in self.path and proxy._take():
                    if proxy.mode != "slow":
                        return self._fail()
                    time.sleep(proxy.delay_s)
                conn = http.client.HTTPConnection(proxy.target, timeout=30)
                # the client's Expect: 100-continue was answered here, and its chunks read: neither is forwarded
                hop = ("expect", "transfer-encoding", "content-length")  # the body goes on whole, with its length
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                headers["Content-Length"] = str(len(body))
                if proxy.strip_conditions:
                    headers = {k: v for k, v in headers.items() if k.lower() not in ("if-match", "if-none-match")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            def _fail(self):
                if proxy.mode == "reset":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                code = 503 if proxy.mode == "503" else 500
                err = "SlowDown" if code == 503 else "InternalError"
                xml = f"<Error><Code>{err}</Code><Message>Please reduce your request rate.</Message></Error>"
                self.send_response(code)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                self.wfile.write(xml.encode())

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = do_PATCH = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _take(self) -> bool:
        with self.lock:
            if self.remaining == 0:
                return False
            self.remaining -= 1 if self.remaining > 0 else 0  # -1: without end
            self.injected += 1
            return True

    def close(self):
        self.server.shutdown()
        self.server.server_close()
