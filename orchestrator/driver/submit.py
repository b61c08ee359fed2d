"""``flowpp submit``: the same entrypoint as ``ray job submit``, through JobSubmissionClient."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from orchestrator.config import JobSpec
from orchestrator.core.errors import UserError
from orchestrator.core.redact import carries_secret, printable, redact
from orchestrator.driver.jobstate import JobRunningError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


JOB_KEY = "flowpp.job"
"""The submission's metadata key that names its job, so that a running one can be found."""


def entrypoint(job_path: str, overrides: list[str], new_run: bool = False) -> str:
    sets = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    flags = " --new-run" if new_run else ""
    return f"python -m orchestrator train {shlex.quote(job_path)}{flags} {sets}".strip()


def running_submission(client, name: str) -> str | None:
    """The submission id of a pending or running submission of job ``name``, or None."""
    for job in client.list_jobs():
        status = str(job.status).rsplit(".", 1)[-1]
        if (job.metadata or {}).get(JOB_KEY) == name and status not in TERMINAL:
            return job.submission_id or job.job_id
    return None


def _refuse_credentials(overrides: list[str]) -> None:
    """A ``--set`` holding a credential would sit in the job's entrypoint, shown to anyone who lists jobs."""
    leaking = [o.partition("=")[0] for o in overrides if carries_secret(o)]
    if leaking:
        raise UserError(
            f"--set {', '.join(leaking)}: the value holds a credential (URL user-info or a credential "
            "variable's value), and a Ray job's entrypoint is public to whoever can list jobs; have the "
            "YAML read it as ${FLOWPP_...} and pass the variable in ray.runtime_env.env_vars"
        )


CREDENTIAL_FILES = {".env", ".netrc", ".git-credentials", ".pgpass", "credentials", "id_rsa", "id_ecdsa",
                    "id_ed25519", ".dockercfg"}  # fmt: skip
CREDENTIAL_SUFFIXES = (".pem", ".key", ".p12", ".pfx")
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".ruff_cache", ".pytest_cache", ".mypy_cache"}


def _uploaded(root: Path) -> list[str]:
    """The files Ray would upload from ``root`` (its working_dir): git's view where ``root`` is in a
    repository (Ray leaves out what .gitignore names), else every file."""
    import subprocess

    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                             capture_output=True, timeout=30, check=True).stdout  # fmt: skip
        return [f for f in out.decode(errors="replace").split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        found = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
            found += [os.path.relpath(os.path.join(folder, f), root) for f in files]
        return found


def credential_files(root: Path, excludes: list[str]) -> list[str]:
    """Files in what ``flowpp submit`` uploads that hold credentials by their names (``.env``,
    ``.aws/credentials``, keys), less those ``ray.runtime_env.excludes`` leaves out."""
    import fnmatch

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        return any(fnmatch.fnmatch(rel, e.strip("/")) or any(fnmatch.fnmatch(p, e.strip("/")) for p in parts)
                   for e in excludes)  # fmt: skip

    found = []
    for rel in _uploaded(root):
        name = rel.rsplit("/", 1)[-1]
        named = name in CREDENTIAL_FILES or name.startswith(".env.") or name.endswith(CREDENTIAL_SUFFIXES)
        if named and not excluded(rel):
            found.append(rel)
    return sorted(found)


def check_submittable(spec: JobSpec, overrides: list[str], root: Path | None = None) -> None:
    """What ``submit`` refuses before reaching the cluster (also checked by ``--dry-run``): a
    credential in ``--set``, no ``ray.address``, and credential files in the working directory it
    uploads (``root``, default the current one)."""
    _refuse_credentials(overrides)
    leaking = credential_files(root or Path.cwd(), list(spec.ray.runtime_env.get("excludes") or []))
    if leaking:
        shown = ", ".join(printable(f) for f in leaking[:5]) + (
            f" and {len(leaking) - 5} more" if len(leaking) > 5 else ""
        )
        raise UserError(
            f"the working directory that flowpp submit uploads to the cluster holds credential files: {shown}; "
            "run it from the project's folder, or leave them out in ray.runtime_env.excludes (or .gitignore)"
        )
    if not spec.ray.address:
        raise UserError("ray.address: not set in the job spec (e.g. http://127.0.0.1:8265)")


def submit(spec: JobSpec, job_path: str, overrides: list[str], follow: bool = True, new_run: bool = False) -> int:
    """Submit the job unless a submission of the same job is still pending or running.

    (The driver's lock, ``orchestrator.driver.jobstate``, also refuses a second run of the job
    however it was started: ``ray job submit``, another client, another cluster.)
    """
    from ray.job_submission import JobSubmissionClient

    check_submittable(spec, overrides)
    assert spec.ray.address is not None
    client = JobSubmissionClient(spec.ray.address)
    running = running_submission(client, spec.name)
    if running:
        raise JobRunningError(
            f"job {spec.name} is already running on {spec.ray.address} as {running}; wait for it "
            f"(`flowpp logs {running}`) or stop it (`flowpp stop {running}`)"
        )
    runtime_env = {"working_dir": ".", **spec.ray.runtime_env}
    job_id = client.submit_job(
        entrypoint=entrypoint(job_path, overrides, new_run),
        runtime_env=runtime_env,
        metadata={JOB_KEY: spec.name},
        entrypoint_num_cpus=spec.ray.entrypoint_num_cpus or None,
        entrypoint_num_gpus=spec.ray.entrypoint_num_gpus or None,
    )
    print(f"submitted {job_id} to {redact(spec.ray.address)}", flush=True)
    if not follow:
        default = os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"  # the default of flowpp logs
        where = "" if spec.ray.address == default else f"--address {redact(spec.ray.address)} "
        print(f"follow it with `flowpp logs {where}{job_id}`, stop it with `flowpp stop {where}{job_id}`")
        return 0
    return follow_logs(client, job_id)


def follow_logs(client, job_id: str, poll_s: float = 1.0) -> int:
    """Print the job's logs as they come, masked as ``flowpp logs`` masks them (``redact``), whole
    lines at a time while it runs (so a secret is never cut in two across polls); its exit status."""
    seen = 0
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        logs = client.get_job_logs(job_id)
        end = len(logs) if status in TERMINAL else logs.rfind("\n", seen) + 1
        if end > seen:
            sys.stdout.write(redact(logs[seen:end]))
            sys.stdout.flush()
            seen = end
        if status in TERMINAL:
            print(f"job {job_id}: {status}")
            return 0 if status == "SUCCEEDED" else 1
        time.sleep(poll_s)
