"""Ray token authentication: a token file (mode 0600) and the environment that points Ray at it.

Ray 2.60 reads ``RAY_AUTH_MODE`` (``token``) and the token from ``RAY_AUTH_TOKEN`` or the file
named by ``RAY_AUTH_TOKEN_PATH``. The token itself never goes into an environment variable, a
log line or an env file here: only the path does. Processes Ray starts (GCS, raylet, workers,
job drivers) inherit the environment, so they read the same file.
"""

from __future__ import annotations

import atexit
import os
import secrets
import sys
import tempfile
from pathlib import Path

MODE_VAR = "RAY_AUTH_MODE"
TOKEN_VAR = "RAY_AUTH_TOKEN"
PATH_VAR = "RAY_AUTH_TOKEN_PATH"


def write_token_file(path: Path) -> Path:
    """A new random token (256 bits) at ``path``, created with mode 0600 (never readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def token_auth_env(path: Path) -> dict[str, str]:
    """The variables that turn token authentication on with the token in ``path``."""
    return {MODE_VAR: "token", PATH_VAR: str(path)}


def enable(path: Path) -> None:
    """Token authentication for this process and its children, with the token in ``path``."""
    os.environ.update(token_auth_env(path))
    os.environ.pop(TOKEN_VAR, None)
    _refresh_ray()


def _refresh_ray() -> None:
    """Ray caches its config and the token when ``ray`` is imported; read both again if it is
    (what ``ray`` itself does when it turns token auth on)."""
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def has_token() -> bool:
    """Token mode is on and a token is reachable (in the environment or a non-empty file)."""
    if os.environ.get(MODE_VAR) != "token":
        return False
    if os.environ.get(TOKEN_VAR):
        return True
    path = os.environ.get(PATH_VAR)
    return path is not None and os.path.isfile(path) and os.path.getsize(path) > 0


def ensure_for_embedded() -> None:
    """Before a local ``ray.init()``: keep a configured token, or make one for this process.

    The per-process token lives in a 0600 temporary file that is removed at exit. Ray's own
    fallback would write ``~/.ray/auth_token``, which then turns token mode on for every later
    Ray on the machine; this avoids it. A disabled auth mode is not honoured.
    """
    if has_token():
        _refresh_ray()
        return
    fd, name = tempfile.mkstemp(prefix="flowpp-ray-token-")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    path = Path(name)
    atexit.register(path.unlink, missing_ok=True)
    enable(path)
