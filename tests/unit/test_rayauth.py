"""Ray token authentication for an embedded Ray: a token file of mode 0600, never auth disabled."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from orchestrator.driver import rayauth

pytestmark = pytest.mark.unit


@pytest.fixture
def clean_env(monkeypatch):
    for var in (rayauth.MODE_VAR, rayauth.TOKEN_VAR, rayauth.PATH_VAR):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("mode", [None, "disabled"])
def test_embedded_ray_gets_a_private_token_file_even_if_auth_was_disabled(clean_env, monkeypatch, mode):
    if mode:
        monkeypatch.setenv(rayauth.MODE_VAR, mode)
    rayauth.ensure_for_embedded()
    path = os.environ[rayauth.PATH_VAR]
    assert os.environ[rayauth.MODE_VAR] == "token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = Path(path).read_text()
    assert len(token) == 64 and int(token, 16)
    assert not any(token in v for v in os.environ.values())  # only the path travels


def test_a_configured_token_is_kept(clean_env, tmp_path, monkeypatch):
    path = rayauth.write_token_file(tmp_path / "token")
    monkeypatch.setenv(rayauth.MODE_VAR, "token")
    monkeypatch.setenv(rayauth.PATH_VAR, str(path))
    rayauth.ensure_for_embedded()
    assert os.environ[rayauth.PATH_VAR] == str(path)
    with pytest.raises(FileExistsError):  # never overwrites a token
        rayauth.write_token_file(path)
