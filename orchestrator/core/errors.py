"""The one error base of the orchestrator, and the exit codes the CLI turns errors into.

Every error a user can cause or a run can meet derives from ``FlowppError``, whose
message names the field, file or URL at fault and never a credential. ``cli.main``
catches the base once, prints the message on one line and exits with the error's
``exit_code``: 2 for a user mistake (``UserError``), 1 for a runtime failure.
"""

from __future__ import annotations

from orchestrator.core.redact import redact

USER_MISTAKE = 2
RUNTIME_FAILURE = 1


class FlowppError(Exception):
    """A failure the CLI reports in one line (exit code 1), without a traceback.

    Its text goes through ``redact.redact`` however it is shown (the CLI, a traceback, Ray's
    report of a worker's error): URL user-info and credential values never leave as text.
    """

    exit_code = RUNTIME_FAILURE

    def __str__(self) -> str:
        return redact(super().__str__())


class UserError(FlowppError):
    """A mistake in what the user asked for: a bad job spec, a missing file, an unknown model (exit code 2)."""

    exit_code = USER_MISTAKE


def validation_problems(exc) -> list[str]:
    """A pydantic ``ValidationError`` as one ``dotted.path: message`` line per problem."""
    return [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
