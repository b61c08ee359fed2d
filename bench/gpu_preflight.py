"""The preflight of call 1: is this machine fit to run the benchmark, and the carried wheels?

Run from the repository root after ``bench/gpu_setup``: ``python3 -m bench.gpu_preflight``. It
prints the GPU, the driver and the versions of torch, CUDA, Python and Triton; imports what the
benchmark needs; then, for the wheels carried into ``--site`` (/tmp/site): the device's own copy
of each package they also hold, and the device's version of every package they require but do
not carry, against the requirement (importlib.metadata, packaging). Exit 0: go on. Exit 3, with
one line that starts ``preflight: STOP:``, on what would break: no CUDA, an import of the
benchmark failing, the carried folder not first on sys.path, or a required package whose
device copy does not satisfy a carried wheel where a mismatch is known to break imports.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement

STOP = 3
BENCHMARK_IMPORTS = ("torch", "triton", "flowpp", "flowpp.ema", "orchestrator.training.step",
                     "orchestrator.training.mfu", "flowpp.flops", "bench.capacity", "bench.gpu_bench")  # fmt: skip
# A device copy outside a carried wheel's requirement that is known to fail at import, and how.
KNOWN_BREAKING = {
    "protobuf": "generated *_pb2 modules check the runtime's version at import (a VersionError, not an ImportError)",
    "typing-extensions": "pydantic and its kin import names that older typing-extensions lack",
    "pydantic-core": "pydantic refuses any pydantic-core but its own pinned version at import",
    "anyio": "starlette and fastapi import AnyIO 4's API at import",
    "numpy": "extension modules built for numpy 2 fail to import under numpy 1",
    "packaging": "mlflow and ray import packaging's newer version API",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Need:
    """A package that carried wheels require, its provider's version, and who asks for what."""

    name: str
    version: str | None  # None: installed nowhere
    carried: bool
    wants: list[tuple[str, str]] = field(default_factory=list)  # (wheel and version, requirement)
    broken: list[str] = field(default_factory=list)  # the requirements it fails


def needs(carried: dict[str, tuple[str, list[str]]], device: dict[str, str]) -> dict[str, Need]:
    """{package: Need} over every carried wheel's Requires-Dist (markers evaluated, no extras).

    ``carried``: {name: (version, requirement strings)}; ``device``: {name: version} outside the
    carried folder. A requirement is met by the carried copy where there is one (it comes first)."""
    out: dict[str, Need] = {}
    for wheel, (wheel_version, requires) in sorted(carried.items()):
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = norm(req.name)
            version = carried[name][0] if name in carried else device.get(name)
            need = out.setdefault(name, Need(name, version, name in carried))
            need.wants.append((f"{wheel} {wheel_version}", str(req.specifier) or "any"))
            if version is not None and not req.specifier.contains(version, prereleases=True):
                need.broken.append(f"{wheel} {wheel_version}'s {req}")
    return out


def verdict(carried: dict[str, tuple[str, list[str]]], device: dict[str, str]) -> tuple[list[str], str | None]:
    """(lines to print, the STOP line or None) for the carried wheels against the device."""
    lines = [f"preflight: {len(carried)} carried wheels; the device's own copy of those it also holds:"]
    shadowed = [f"  {n} carried {v}, device {device[n]}" for n, (v, _) in sorted(carried.items()) if n in device]
    lines += shadowed or ["  (none)"]
    lines.append("preflight: packages the carried wheels require that they do not carry, on the device:")
    stop = None
    for need in sorted(needs(carried, device).values(), key=lambda n: n.name):
        wants = "; ".join(f"{who} wants {spec}" for who, spec in need.wants)
        state = "missing" if need.version is None else "MISMATCH" if need.broken else "ok"
        if not need.carried or need.broken:
            origin = "carried" if need.carried else "device"
            lines.append(f"  {state:<8} {need.name} {need.version or '-'} ({origin}): {wants}")
        if need.broken and need.name in KNOWN_BREAKING and stop is None:
            fix = f"carry it: bench/gpu_wheels .whl --add {need.name}"
            stop = (f"preflight: STOP: {need.name} {need.version} does not satisfy {need.broken[0]}, and that breaks "
                    f"imports ({KNOWN_BREAKING[need.name]}); {fix}")  # fmt: skip
    return lines, stop


def installed(path: list[str]) -> dict[str, md.Distribution]:
    """{name: distribution} on ``path``, the first of each name (as an import would find it)."""
    found: dict[str, md.Distribution] = {}
    for dist in md.distributions(path=path):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(norm(name), dist)
    return found


def carried_and_device(site: str) -> tuple[dict[str, tuple[str, list[str]]], dict[str, str]]:
    carried = {n: (d.version, d.requires or []) for n, d in installed([site]).items()}
    device = {n: d.version for n, d in installed([p for p in sys.path if p.rstrip("/") != site.rstrip("/")]).items()}
    return carried, device


def order_stop(site: str) -> str | None:
    """The STOP line unless ``site`` comes before every site-packages folder on sys.path."""
    paths = [p.rstrip("/") for p in sys.path]
    others = [i for i, p in enumerate(paths) if p.endswith(("site-packages", "dist-packages"))]
    if site.rstrip("/") not in paths:
        return (
            f"preflight: STOP: {site} is not on sys.path: run bench/gpu_setup (it writes the .pth that puts it first)"
        )
    if others and paths.index(site.rstrip("/")) > min(others):
        return f"preflight: STOP: {site} comes after {sys.path[min(others)]} on sys.path: the device's copies would win"
    return None


def machine_lines() -> tuple[list[str], str | None]:
    import torch

    python = f"Python {platform.python_version()} ({sys.executable})"
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    cc = shutil.which("cc") or shutil.which("gcc") or "none (Triton cannot build its launchers)"
    if not torch.cuda.is_available():
        return [f"preflight: no CUDA device; {versions}; {python}"], "preflight: STOP: torch sees no CUDA device"
    props = torch.cuda.get_device_properties(0)
    gpu = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
    return [f"preflight: GPU {gpu}; driver {driver_version()}", f"preflight: {versions}; {python}",
            f"preflight: C compiler {cc}"], None  # fmt: skip


def driver_version() -> str:
    try:
        cmd = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({type(e).__name__})"


def import_stop(modules: tuple[str, ...]) -> tuple[str, str | None]:
    versions = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # a version error at import is not always an ImportError
            return "", f"preflight: STOP: import {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if "." not in name and getattr(module, "__version__", None):
            versions.append(f"{name} {module.__version__}")
    return f"preflight: imported {', '.join(modules)} ({', '.join(versions)})", None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_preflight", description=__doc__.split("\n")[0])
    p.add_argument("--site", default="/tmp/site", help="where bench/gpu_setup installed the carried wheels")
    p.add_argument("--allow-cpu", action="store_true", help="go on without CUDA (tests)")
    default_out = os.path.join(os.environ["OUT"], "preflight.txt") if os.environ.get("OUT") else None
    p.add_argument("--out", default=default_out, help="also write the lines here ($OUT/preflight.txt where OUT is set)")
    args = p.parse_args(argv)
    lines: list[str] = []
    code = run(args, lines)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return code


def run(args: argparse.Namespace, lines: list[str]) -> int:
    def say(*text: str) -> None:
        lines.extend(text)
        print("\n".join(text), flush=True)

    machine, stop = machine_lines()
    say(*machine)
    if stop and not args.allow_cpu:
        say(stop)
        return STOP
    cuda = stop is None
    line, stop = import_stop(tuple(m for m in BENCHMARK_IMPORTS if cuda or m != "triton"))
    say(line or stop)
    if stop:
        return STOP
    carried, device = carried_and_device(args.site)
    if not carried:
        say(f"preflight: no carried wheels in {args.site}: nothing to check against the device")
        return 0
    checked, stop = verdict(carried, device)
    stop = order_stop(args.site) or stop
    say(*checked, stop or "preflight: ok")
    return STOP if stop else 0


if __name__ == "__main__":
    sys.exit(main())
