"""``${VAR}`` and ``${VAR:-default}`` in a job YAML, from an allow-list of environment variables.

A job spec reads only the variables it is meant to read: names starting with ``FLOWPP_``,
``MLFLOW_TRACKING_URI``, and those its top-level ``env_allow`` lists. Reading any other variable
(an AWS key, a token) is a problem that names the variable, never its value; so are an unset
variable without a default and a value spanning lines (it would add YAML of its own). Every
problem is collected, with its line, and ``config.load_job`` reports them all at once.

``env_allow`` is read before anything is expanded: from the text with each reference replaced
by a run of ``~`` of the same length (``placeholders``), which parses as the expanded text
would, with every line and column in place. References in YAML comments are left alone.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Mapping
from typing import Any

ALWAYS_PREFIX = "FLOWPP_"
ALWAYS = frozenset({"MLFLOW_TRACKING_URI"})
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def placeholders(text: str) -> str:
    """``text`` with each ``${...}`` as a run of ``~`` of its length: a plain YAML string in its place."""
    return REFERENCE.sub(lambda m: "~" * len(m.group(0)), text)


def scalar_spans(placeholder_text: str, loader: Any) -> list[tuple[int, int]]:
    """(start, end) character offsets of every scalar (key or value) of the document: the only
    places a reference is expanded; a comment is none of them (yaml.YAMLError if it does not scan)."""
    import yaml

    return [
        (t.start_mark.index, t.end_mark.index)
        for t in yaml.scan(placeholder_text, Loader=loader)
        if isinstance(t, yaml.ScalarToken)
    ]


def allowed_names(tree: Any) -> tuple[set[str], list[str]]:
    """The names in a job tree's ``env_allow`` (read from the placeholder text), and its problems."""
    raw = tree.get("env_allow") if isinstance(tree, dict) else None
    if raw is None:
        return set(), []
    if not isinstance(raw, list):
        return set(), [f"env_allow: expected a list of variable names, got {type(raw).__name__}"]
    good = {n for n in raw if isinstance(n, str) and NAME.match(n)}
    bad = [
        f"env_allow[{i}]: {n!r} is not a variable name (write NAME, not ${{NAME}})"
        for i, n in enumerate(raw)
        if n not in good
    ]
    return good, bad


def is_allowed(name: str, allow: set[str] | frozenset[str] = frozenset()) -> bool:
    return name.startswith(ALWAYS_PREFIX) or name in ALWAYS or name in allow


def expand(
    text: str,
    allow: set[str] | frozenset[str] = frozenset(),
    spans: list[tuple[int, int]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[str, list[str]]:
    """``text`` with its references expanded, and the problems, each naming its line and variable.

    ``spans``: where references count (``scalar_spans``); None: everywhere.
    """
    env = os.environ if environ is None else environ
    starts = [s for s, _ in spans or []]
    problems: list[str] = []

    def one(m: re.Match) -> str:
        if spans is not None:
            i = bisect.bisect_right(starts, m.start()) - 1
            if i < 0 or m.start() >= spans[i][1]:
                return m.group(0)  # in a comment
        name, default = m.group(1), m.group(2)
        where = f"line {text.count(chr(10), 0, m.start()) + 1}: ${{{name}}}"
        if not is_allowed(name, allow):
            problems.append(f"{where}: a job spec reads only FLOWPP_*, MLFLOW_TRACKING_URI and the names in env_allow")
            return m.group(0)
        value = env.get(name, default)
        if value is None:
            problems.append(f"{where}: {name} is not set and has no default (write ${{{name}:-default}})")
        elif "\n" in value or "\r" in value:
            problems.append(f"{where}: the value of {name} spans lines")
        else:
            return value
        return m.group(0)

    return REFERENCE.sub(one, text), problems
