"""MLflow outages as production meets them: what a training step and a registration cost while the
tracking server is down, refusing connections, or hung (a socket that accepts and never answers).

    python bench/mlflow_outage.py [--steps 10] [--budget 10]

A real MLflow server (sqlite, local artifacts) on 127.0.0.1 and one run. The project's own settings
only (``tracking.connection``: MLflow's retries none, its timeout ``HTTP_TIMEOUT_S``); everything
else is MLflow's default environment. Rows:

- one report (``RunLogger.metrics``, as the training loop makes it every ``log_every`` steps) with
  the server up, then killed (connections refused), then behind a hung socket: the median and the
  largest time of ``--steps`` reports;
- a registration (``RunLogger.register_model``, ``mlflow.retry_budget_s`` = ``--budget``) against
  the refused address and the hung socket: how long until it gives up, against the bound of the
  budget plus one HTTP timeout.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
           "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts"]  # fmt: skip
    log = open(folder / "server.log", "wb")  # noqa: SIM115  (the server's, for its life)
    # without MLflow's job runner, as the local stack and the cluster run the server
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).close()
            return proc, uri
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the MLflow server did not start: see {folder / 'server.log'}") from None
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # its own group, by pid: the server and its workers
    proc.wait()


class HungServer:
    """Accepts every connection on 127.0.0.1 and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def reports(logger, steps: int, first_step: int) -> list[float]:
    times = []
    for step in range(first_step, first_step + steps):
        t0 = time.perf_counter()
        logger.metrics({"train_bpd": 5.0, "lr": 1e-3}, step)
        times.append(time.perf_counter() - t0)
    return times


def registration(uri: str, budget: float) -> tuple[float, str]:
    import torch

    from orchestrator import tracking
    from orchestrator.core.redact import first_line

    model = torch.nn.Linear(2, 2)  # never logged: the server does not answer
    logger = tracking.RunLogger(uri, "0" * 32, retry_budget_s=budget)
    t0 = time.monotonic()
    try:
        logger.register_model(model, "never", {"val_bpd": "5.0"})
        outcome = "registered?"
    except tracking.RegistrationError as exc:
        outcome = first_line(exc)[:60]
    return time.monotonic() - t0, outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="reports timed in each state")
    ap.add_argument("--budget", type=float, default=10.0, help="mlflow.retry_budget_s of the registrations")
    args = ap.parse_args()
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        os.environ.pop(var, None)  # MLflow's defaults, but for what the project sets

    from orchestrator import tracking
    from orchestrator.tracking.connection import HTTP_TIMEOUT_S

    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, uri = start_server(Path(tmp))
        try:
            client = tracking.client_for(uri)
            run_id = client.create_run(client.create_experiment("outage")).info.run_id
            logger = tracking.RunLogger(uri, run_id, flush_timeout_s=1.0)
            up = reports(logger, args.steps, 0)
        finally:
            stop_server(proc)
        down = reports(logger, args.steps, args.steps)
        logger.flush()
        hung = HungServer()
        try:
            stuck = tracking.RunLogger(hung.uri, run_id, flush_timeout_s=1.0)
            stalled = reports(stuck, args.steps, 0)
            stuck.flush()
            reg_hung = registration(hung.uri, args.budget)
        finally:
            hung.close()
        reg_refused = registration(f"http://127.0.0.1:{free_port()}", args.budget)
    for name, times in (("server up", up), ("server killed (refused)", down), ("server hung", stalled)):
        rows.append((f"report, {name}", f"median {statistics.median(times) * 1e3:.1f} ms",
                     f"max {max(times) * 1e3:.0f} ms"))  # fmt: skip
    bound = args.budget + HTTP_TIMEOUT_S
    for name, (took, outcome) in (("refused", reg_refused), ("hung", reg_hung)):
        rows.append((f"registration, server {name}", f"{took:.1f} s (bound {bound:.0f} s)", outcome))
    print(f"MLflow outages: {args.steps} reports a state; registration budget {args.budget:g} s, "
          f"HTTP timeout {HTTP_TIMEOUT_S} s, MLflow retries none (the project's settings)")  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print(f"| {'what':<{width}} | time | note |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for what, time_s, note in rows:
        print(f"| {what:<{width}} | {time_s} | {note} |")


if __name__ == "__main__":
    main()
