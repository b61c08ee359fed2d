"""bench/gpu_preflight.py: the carried wheels' requirements against the device's packages, and the
order of sys.path, read from real dist-info metadata."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench import gpu_preflight as pf

pytestmark = pytest.mark.unit


def test_a_known_breaking_mismatch_stops_with_one_line_and_names_the_fix():
    carried = {
        "opentelemetry-proto": ("1.45.2", ["protobuf<8.0,>=5.0"]),
        "pydantic": ("2.14.4", ["typing-extensions>=4.16"]),
    }
    lines, stop = pf.verdict(carried, {"protobuf": "4.25.3", "typing-extensions": "4.16.0"})
    assert stop == (
        "preflight: STOP: protobuf 4.25.3 does not satisfy opentelemetry-proto 1.45.2's protobuf<8.0,>=5.0, and that "
        f"breaks imports ({pf.KNOWN_BREAKING['protobuf']}); carry it: bench/gpu_wheels .whl --add protobuf"
    )
    assert "  MISMATCH protobuf 4.25.3 (device): opentelemetry-proto 1.45.2 wants <8.0,>=5.0" in lines
    assert "  ok       typing-extensions 4.16.0 (device): pydantic 2.14.4 wants >=4.16" in lines


def test_other_mismatches_and_missing_packages_are_reported_without_stopping():
    carried = {
        "ray": ("2.60.0", ["click>=7.0", "msgpack<2,>=1", "tzdata; extra == 'serve'", "nope; python_version < '3'"])
    }
    lines, stop = pf.verdict(carried, {"click": "6.7", "ray": "2.0.0"})
    assert stop is None
    assert "  ray carried 2.60.0, device 2.0.0" in lines  # the device's own copy of a carried package
    assert "  MISMATCH click 6.7 (device): ray 2.60.0 wants >=7.0" in lines
    assert "  missing  msgpack - (device): ray 2.60.0 wants <2,>=1" in lines
    assert not any("tzdata" in ln or "nope" in ln for ln in lines)  # extras and false markers do not count


def test_a_carried_copy_meets_requirements_before_the_device_copy():
    carried = {"pydantic": ("2.14.4", ["pydantic-core==2.50.5"]), "pydantic-core": ("2.50.5", [])}
    lines, stop = pf.verdict(carried, {"pydantic-core": "2.27.0"})
    assert stop is None and not any("MISMATCH" in ln for ln in lines)
    lines, stop = pf.verdict({"pydantic": ("2.14.4", ["pydantic-core==2.50.5"]), "pydantic-core": ("2.41.0", [])}, {})
    assert stop and stop.startswith("preflight: STOP: pydantic-core 2.41.0 does not satisfy pydantic 2.14.4's")


def dist_info(site: Path, name: str, version: str, requires: list[str]) -> None:
    folder = site / f"{name.replace('-', '_')}-{version}.dist-info"
    folder.mkdir(parents=True)
    meta = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        *(f"Requires-Dist: {r}" for r in requires),
    ]
    (folder / "METADATA").write_text("\n".join(meta) + "\n")


def test_main_reads_the_carried_folder_and_stops_on_the_device_copy(tmp_path, monkeypatch, capsys):
    """Real metadata: a carried wheel that wants a typing-extensions newer than any installed here."""
    site = tmp_path / "site"
    dist_info(site, "carried-thing", "1.0", ["typing-extensions>=999", "packaging"])
    monkeypatch.syspath_prepend(str(site))
    assert pf.main(["--site", str(site), "--allow-cpu", "--out", str(tmp_path / "preflight.txt")]) == pf.STOP
    out = capsys.readouterr().out.splitlines()
    assert (tmp_path / "preflight.txt").read_text().splitlines() == out
    assert (
        out[-1].startswith("preflight: STOP: typing-extensions ")
        and "carried-thing 1.0's typing-extensions>=999" in out[-1]
    )
    assert any(ln.startswith("  ok       packaging ") for ln in out)
    assert any(ln.startswith("preflight: imported torch, flowpp") for ln in out)


def test_the_carried_folder_must_come_first_on_sys_path(tmp_path, monkeypatch):
    site = str(tmp_path / "site")
    assert "is not on sys.path: run bench/gpu_setup" in pf.order_stop(site)
    monkeypatch.setattr(sys, "path", ["/x", "/usr/lib/python3/site-packages", site])
    assert "comes after /usr/lib/python3/site-packages" in pf.order_stop(site)
    monkeypatch.setattr(sys, "path", ["/x", site, "/usr/lib/python3/site-packages"])
    assert pf.order_stop(site) is None
