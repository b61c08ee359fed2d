"""The one redaction of the project: what a log line, an MLflow param, tag or artifact, a Ray job's
metadata or an error message may carry is passed through here first.

Four things are masked as ``***``:

- URL user-info: ``https://user:pass@host/x`` becomes ``https://***@host/x``, in any text;
- a URL query parameter whose name reads as a credential: ``?password=x&access_token=y`` becomes
  ``?password=***&access_token=***``, in any text;
- the values of credential environment variables present in this process (``SECRET_ENV`` and every
  variable whose name reads as a credential: ``*_SECRET_*``, ``*_PASSWORD``, ``PGPASSWORD``,
  ``*_TOKEN``, ``*_KEY``...);
- in a tree (the job spec as plain data), the value of every credential-like key and every value
  under an ``env_vars`` key (a runtime environment's variables, whatever their names).

``RedactingFilter`` applies ``redact`` to every log record a handler emits; ``orchestrator.core.logs``
installs it on the process's handlers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from typing import Any

MASK = "***"
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "RAY_AUTH_TOKEN",
)
"""Credential variables whose values are masked wherever they appear, whatever else their names say."""
MIN_SECRET_LEN = 4
"""Shorter values are not masked in free text: masking ``1`` or ``on`` would garble every line."""

# scheme://userinfo@ ; userinfo runs to the last @ before the host's end (/, ?, #, space, quote)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s'\"<>]*@")
_SECRET_WORDS = {"secret", "secrets", "password", "passwd", "passphrase", "token", "credential", "credentials",
                 "signature"}  # fmt: skip
_GLUED = ("secret", "password", "passwd", "passphrase", "token")
"""Also at the end of a word: ``PGPASSWORD``, ``APITOKEN``."""
_QUERY_SECRET = re.compile(r"(?P<lead>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&#;\s'\"<>]*)")

_KEY_WORDS = {"key", "apikey"}
_NOT_A_VALUE = {"path", "file", "mode", "dir", "type", "name", "kind", "url", "endpoint", "region"}
"""A name ending in one of these holds where or how a secret is found, not the secret itself
(``RAY_AUTH_TOKEN_PATH``, ``RAY_AUTH_MODE``)."""


def _words(name: str) -> list[str]:
    """``AWS_SECRET_ACCESS_KEY`` -> [aws, secret, access, key]; ``apiKey`` -> [api, key]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(name))
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]


def is_secret_name(name: str) -> bool:
    """Whether a key or variable name reads as a credential: secret, password, token, key, credential..."""
    words = _words(name)
    if not words or words[-1] in _NOT_A_VALUE:
        return False
    return any(w in _SECRET_WORDS or w in _KEY_WORDS or w.endswith(_GLUED) for w in words)


def secret_values(extra: Iterable[str | None] = ()) -> list[str]:
    """The credential values known to this process: ``extra`` and the credential variables' values,
    longest first (so that a secret containing another is masked whole)."""
    names = set(SECRET_ENV) | {k for k in os.environ if is_secret_name(k)}
    values = {v for v in (*extra, *(os.environ.get(k) for k in names)) if v and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def strip_userinfo(url: str) -> str:
    """``scheme://user:pass@host/x`` -> ``scheme://host/x``: an address fit to name in a message."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc.rsplit('@', 1)[-1]}{slash}{path}"


def redact(text: str, extra: Iterable[str | None] = ()) -> str:
    """``text`` with URL user-info and every known credential value (``secret_values(extra)``) as ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", str(text))
    text = _QUERY_SECRET.sub(lambda m: m["lead"] + MASK if is_secret_name(m["name"]) and m["value"] else m[0], text)
    for value in secret_values(extra):
        text = text.replace(value, MASK)
    return text


def redact_tree(tree: Any, extra: Iterable[str | None] = ()) -> Any:
    """A copy of plain data (the job spec's ``model_dump()``) safe to log or store: credential-like
    keys and every ``env_vars`` value masked, every string through ``redact``."""
    known = secret_values(extra)
    return _redact_tree(tree, known, under_env=False)


def _redact_tree(tree: Any, known: list[str], under_env: bool) -> Any:
    if isinstance(tree, dict):
        return {
            k: MASK if (under_env or is_secret_name(k)) and v not in (None, "", {}, []) else
            _redact_tree(v, known, under_env=str(k) == "env_vars")
            for k, v in tree.items()
        }  # fmt: skip
    if isinstance(tree, (list, tuple)):
        return [_redact_tree(v, known, under_env) for v in tree]
    if isinstance(tree, str):
        return redact(tree, known)
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train.lr": 4e-4, ...}: the spec as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def public_params(spec: Any) -> dict[str, str]:
    """A job spec (``config.JobSpec``) flattened for MLflow, through ``redact_tree``."""
    return {k: str(v)[:6000] for k, v in flatten(redact_tree(spec.model_dump())).items()}  # MLflow's longest param


SPEC_TAG = "spec."
"""The prefix of the tags that carry the whole flattened spec (``spec.train.warmup_steps``)."""

HEADLINE = ("model.preset", "model.num_components", "train.lr")
"""The spec keys a training run logs as MLflow params (a Tune trial adds the keys it searches).
Few on purpose: MLflow's image card on the run page lists every param of the run above the
sample grid, one line each, in a card of fixed height, so each param hides a line of the grid.
The whole spec goes to tags (``SPEC_TAG``) and to the ``job.yaml`` artifact."""


def headline_params(spec: Any) -> dict[str, str]:
    """``HEADLINE`` as params: ``model.num_components`` as the model builds it (the preset's value
    when the spec leaves it out)."""
    flat = public_params(spec)
    out = {k: flat[k] for k in HEADLINE}
    out["model.num_components"] = str(spec.model.flow_config().num_components)
    return out


def spec_tags(spec: Any) -> dict[str, str]:
    """The whole public spec as MLflow tags: ``spec.<dotted key>`` (searchable, shown as run tags)."""
    return {SPEC_TAG + k: v for k, v in public_params(spec).items()}


def without_env_vars(job: dict) -> dict:
    """The job tree workers receive: ``ray.runtime_env.env_vars`` removed. Workers get their
    environment through Ray's runtime_env, never inside ``train_loop_config``, which Ray keeps
    with the run."""
    ray = job.get("ray") or {}
    runtime_env = {k: v for k, v in (ray.get("runtime_env") or {}).items() if k != "env_vars"}
    return {**job, "ray": {**ray, "runtime_env": runtime_env}} if "ray" in job else dict(job)


def first_line(what: BaseException | str) -> str:
    """The first line of a message, redacted: an exception's as ``TypeName: line``."""
    text = str(what).strip()
    line = text.splitlines()[0] if text else ""
    return redact(f"{type(what).__name__}: {line}" if isinstance(what, BaseException) else line)


def printable(name: str) -> str:
    """A name fit for one log line: as it is when every character prints, else its ``repr`` (a
    newline in a file name shows as ``\\n`` and cannot forge a line of its own)."""
    return name if name.isprintable() else repr(name)


def carries_secret(text: str) -> bool:
    """Whether ``text`` holds URL user-info or a known credential value."""
    return redact(text) != text


class RedactingFilter(logging.Filter):
    """Masks URL user-info and known credential values in a record's message, arguments and traceback.
    String arguments that do not print (a newline, an escape sequence) are quoted (``printable``).

    The message is rendered here (``msg % args``) and the record keeps only the masked text, so a
    formatter later down the line cannot put an unmasked argument back.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        known = secret_values()
        if isinstance(record.args, tuple):  # a name with a newline in it cannot forge a line of its own
            record.args = tuple(printable(a) if isinstance(a, str) else a for a in record.args)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return True
        record.msg, record.args = redact(message, known), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, known)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, known)
        return True


def install_filter(handler: logging.Handler) -> None:
    """Add the one ``RedactingFilter`` to ``handler`` (once)."""
    if not any(isinstance(f, RedactingFilter) for f in handler.filters):
        handler.addFilter(RedactingFilter())
