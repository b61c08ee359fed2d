"""The bottom of tracking/: the MLflow module and client for a URI, the URI fit for a message,
the server's reachability, and MLflow's "not found" codes. Everything else in tracking/ talks
to MLflow through here."""

from __future__ import annotations

import ssl
from pathlib import Path

from orchestrator.core.errors import FlowppError, UserError
from orchestrator.core.redact import carries_secret, first_line, redact, strip_userinfo

__all__ = [
    "HTTP_TIMEOUT_S",
    "NOT_FOUND",
    "TrackingUnavailableError",
    "check_reachable",
    "client_for",
    "first_line",
    "mlflow_for",
    "public_uri",
]

HTTP_TIMEOUT_S = 10
"""MLflow's timeout of each HTTP request, set by the project (``mlflow_for``); MLflow's own retries
are set to none: the project's retry budgets (``mlflow.retry_budget_s``) are the only retry policy,
and a call outlives its budget by this much at most. MLflow's defaults (7 retries with backoff, 120 s
a try) kept one request going for minutes whatever the budget said."""

NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
"""What MLflow answers for a missing model, version or alias (and only for a bad request besides)."""


def mlflow_for(tracking_uri: str):
    """The ``mlflow`` module pointed at ``tracking_uri`` (a sqlite store's folder made first)."""
    import os

    import mlflow  # lazy: MLflow's import takes seconds

    # MLflow reads both at each request: the project's budgets decide, not MLflow's retries
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(HTTP_TIMEOUT_S)
    if carries_secret(tracking_uri):  # MLflow prints "View run ... at <this URI>" to stdout, past the log filter
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if tracking_uri.startswith("sqlite:///"):
        import importlib.util

        # mlflow-skinny (the core) has the sqlite store's code but not its libraries ([server] has them)
        if not (importlib.util.find_spec("sqlalchemy") and importlib.util.find_spec("alembic")):
            raise UserError(
                f"mlflow.tracking_uri {tracking_uri}: a sqlite store needs MLflow's server side: "
                "pip install 'flowpp-orchestrator[server]', or point it at an MLflow server (http://...)"
            )
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow


def client_for(tracking_uri: str):
    """An ``MlflowClient`` of ``tracking_uri``."""
    return mlflow_for(tracking_uri).MlflowClient()


class TrackingUnavailableError(FlowppError):
    """The MLflow tracking server cannot be reached or keeps failing; names it, without credentials."""


def public_uri(tracking_uri: str) -> str:
    """The URI without a user:password@ part or any known secret: fit for a message."""
    return redact(strip_userinfo(tracking_uri))


def check_reachable(tracking_uri: str, timeout_s: float = 5.0, field: str = "mlflow.tracking_uri",
                    hint: str = "start it, correct the URI, or set mlflow.enabled: false") -> None:  # fmt: skip
    """Fail now, naming the server, if an http(s) tracking URI does not answer (before any worker starts)."""
    import urllib.error
    import urllib.request

    if not tracking_uri.startswith(("http://", "https://")):
        return  # a local store (sqlite, file): created on first use
    health = public_uri(tracking_uri).rstrip("/") + "/health"
    try:
        urllib.request.urlopen(health, timeout=timeout_s).close()
        return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            return  # it answered (behind an auth proxy, or without a /health route)
        reason = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        reason_exc = getattr(exc, "reason", exc)
        if isinstance(reason_exc, ssl.SSLError):
            return  # it answered; MLflow's client has its own CA settings (MLFLOW_TRACKING_SERVER_CERT_PATH)
        reason = str(reason_exc)
    raise TrackingUnavailableError(
        f"{field}: the MLflow tracking server {public_uri(tracking_uri)} is unreachable ({reason}); {hint}"
    )
