"""``${VAR}`` and ``${VAR:-default}`` in a job YAML, from an allow-list of environment variables.

A job spec reads only the variables it is meant to read: names starting with ``FLOWPP_``,
``MLFLOW_TRACKING_URI``, and those its top-level ``env_allow`` lists. Reading any other variable
(an AWS key, a token) is a problem that names the variable, never its value; so are an unset
variable without a default and a value spanning lines. Every problem is collected, with its line,
and ``config.load_job`` reports them all at once.

References expand after parsing, one scalar at a time, so a value never changes the document's
shape: each reference is first replaced by a token of private-use characters (a plain YAML string,
on the same line), the text is parsed, and only then is each token in a scalar replaced by its
value. A value holding ``#``, ``: `` or ``{a: 1}`` stays text. A plain (unquoted) scalar is typed
from its final text as YAML types a plain scalar (``${FLOWPP_LR}`` holding ``3e-4`` is a number, as
if written there), a quoted one stays a string. ``:-`` follows the shell: the default also
replaces a variable that is set but empty. ``env_allow`` is read from the document before anything
is expanded. A reference in a YAML comment goes with the comment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

ALWAYS_PREFIX = "FLOWPP_"
ALWAYS = frozenset({"MLFLOW_TRACKING_URI"})
REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}\n]*))?\}")
NOT_ALLOWED = "a job spec reads only FLOWPP_*, MLFLOW_TRACKING_URI and the names in env_allow"
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


TOKEN = re.compile("\ue000(\\d+)\ue001")
"""A reference's stand-in while the text is parsed: private-use characters around its index."""


def tokenize(text: str) -> tuple[str, list[re.Match]]:
    """``text`` with each reference replaced by its token, and the references in order."""
    refs: list[re.Match] = []

    def one(m: re.Match) -> str:
        refs.append(m)
        return f"\ue000{len(refs) - 1}\ue001"

    return REFERENCE.sub(one, text), refs


def untokenize(value: Any, refs: list[re.Match]) -> Any:
    """A string with each token put back as the reference it stands for (other values as they are)."""
    return TOKEN.sub(lambda t: refs[int(t.group(1))].group(0), value) if isinstance(value, str) else value


def allowed_names(tree: Any, refs: list[re.Match] = ()) -> tuple[set[str], list[str]]:  # type: ignore[assignment]
    """The names in a job tree's ``env_allow`` (read before anything is expanded), and its problems."""
    raw = tree.get("env_allow") if isinstance(tree, dict) else None
    if raw is None:
        return set(), []
    if not isinstance(raw, list):
        return set(), [f"env_allow: expected a list of variable names, got {type(raw).__name__}"]
    raw = [untokenize(n, refs) for n in raw]
    good = {n for n in raw if isinstance(n, str) and NAME.match(n)}
    bad = [
        f"env_allow[{i}]: {n!r} is not a variable name (write NAME, not ${{NAME}})"
        for i, n in enumerate(raw)
        if n not in good
    ]
    return good, bad


def is_allowed(name: str, allow: set[str] | frozenset[str] = frozenset()) -> bool:
    return name.startswith(ALWAYS_PREFIX) or name in ALWAYS or name in allow


def expand_tree(text: str, loader_cls: Any, environ: Mapping[str, str] | None = None) -> tuple[Any, list[str]]:
    """The document in ``text``, parsed by ``loader_cls`` (a PyYAML loader), with its references
    expanded scalar by scalar; and the problems, each naming its line and variable (yaml.YAMLError
    if the text does not parse)."""
    import yaml

    env = os.environ if environ is None else environ
    tokenized, refs = tokenize(text)
    loader = loader_cls(tokenized)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, []
        allow, problems = allowed_names(loader.construct_document(root), refs)

        def value(i: int) -> str | None:
            m = refs[i]
            name, default = m.group(1), m.group(2)
            where = f"line {text.count(chr(10), 0, m.start()) + 1}: ${{{name}}}"
            if not is_allowed(name, allow):
                problems.append(f"{where}: {NOT_ALLOWED}")
                return None
            found = env.get(name)
            if default is not None and not found:  # the shell's :- (unset or empty)
                found = default
            if found is None:
                problems.append(f"{where}: {name} is not set and has no default (write ${{{name}:-default}})")
            elif "\n" in found or "\r" in found:
                problems.append(f"{where}: the value of {name} spans lines")
            else:
                return found
            return None

        for node in sorted(_scalars(root), key=lambda n: n.start_mark.index):  # problems in text order
            if not TOKEN.search(node.value):
                continue
            implicit = node.style is None and node.tag == loader.resolve(yaml.ScalarNode, node.value, (True, False))
            node.value = TOKEN.sub(lambda t: value(int(t.group(1))) or "", node.value)
            if implicit:  # typed from its final text, as if written there
                node.tag = loader.resolve(yaml.ScalarNode, node.value, (True, False))
        return (None if problems else loader.construct_document(root)), problems
    finally:
        loader.dispose()


def _scalars(node: Any) -> Iterator[Any]:
    """Every scalar node under ``node``, keys included (a job spec has no aliases, so no cycles)."""
    import yaml

    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.ScalarNode):
            yield n
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.extend((k, v))
