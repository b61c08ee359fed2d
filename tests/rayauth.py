"""Ray token authentication for tests that start Ray themselves (never with auth disabled).

``token_auth(directory)`` writes a fresh token to ``directory/ray_token`` (mode 0600) and sets
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` for this process and the Ray processes it
starts; ``restore()`` on the returned object puts the previous environment back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.driver import rayauth

_VARS = (rayauth.MODE_VAR, rayauth.TOKEN_VAR, rayauth.PATH_VAR)


@dataclass
class TokenAuth:
    path: Path
    previous: dict[str, str | None] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The variables a subprocess needs to reach the Ray started with this token."""
        return rayauth.token_auth_env(self.path)

    def restore(self) -> None:
        for key, value in self.previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def token_auth(directory: Path) -> TokenAuth:
    previous = {k: os.environ.get(k) for k in _VARS}
    path = rayauth.write_token_file(Path(directory) / "ray_token")
    rayauth.enable(path)
    return TokenAuth(path, previous)
