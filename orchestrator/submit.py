"""``flowpp submit``: the same entrypoint as ``ray job submit``, through JobSubmissionClient."""

from __future__ import annotations

import shlex
import sys
import time

from orchestrator.config import JobSpec
from orchestrator.errors import UserError
from orchestrator.redact import carries_secret, redact

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def entrypoint(job_path: str, overrides: list[str]) -> str:
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    return f"python -m orchestrator train {shlex.quote(job_path)} {sets}".strip()


def _refuse_credentials(overrides: list[str]) -> None:
    """A ``--set`` holding a credential would sit in the job's entrypoint, shown to anyone who lists jobs."""
    leaking = [o.partition("=")[0] for o in overrides if carries_secret(o)]
    if leaking:
        raise UserError(
            f"--set {', '.join(leaking)}: the value holds a credential (URL user-info or a credential "
            "variable's value), and a Ray job's entrypoint is public to whoever can list jobs; have the "
            "YAML read it as ${FLOWPP_...} and pass the variable in ray.runtime_env.env_vars"
        )


def submit(spec: JobSpec, job_path: str, overrides: list[str], follow: bool = True) -> int:
    from ray.job_submission import JobSubmissionClient

    _refuse_credentials(overrides)
    if not spec.ray.address:
        raise UserError("ray.address: not set in the job spec (e.g. http://127.0.0.1:8265)")
    client = JobSubmissionClient(spec.ray.address)
    runtime_env = {"working_dir": ".", **spec.ray.runtime_env}
    job_id = client.submit_job(
        entrypoint=entrypoint(job_path, overrides),
        runtime_env=runtime_env,
        entrypoint_num_cpus=spec.ray.entrypoint_num_cpus or None,
        entrypoint_num_gpus=spec.ray.entrypoint_num_gpus or None,
    )
    print(f"submitted {job_id} to {redact(spec.ray.address)}", flush=True)
    if not follow:
        return 0
    return follow_logs(client, job_id)


def follow_logs(client, job_id: str, poll_s: float = 1.0) -> int:
    seen = 0
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > seen:
            sys.stdout.write(logs[seen:])
            sys.stdout.flush()
            seen = len(logs)
        if status in TERMINAL:
            print(f"job {job_id}: {status}")
            return 0 if status == "SUCCEEDED" else 1
        time.sleep(poll_s)
