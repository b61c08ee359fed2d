"""``manifest.json``: the typed record of one split's shards, validated wherever it is read.

A pydantic model with ``extra="forbid"`` (``orchestrator.core.strict``). Loading one
checks, and reports at once, each problem with the manifest's URL and the field's path:

- every count and size is non-negative, and the totals equal the sum over the shards;
- every shard URL lies inside the manifest's own folder (no ``..``, no other bucket or scheme).
  Only the reader may allow shards elsewhere (``allow_external``: the job spec's
  ``data.allow_external_shards``), and then only on the storage's own schemes (s3://, file://):
  never http(s), so a manifest cannot make a reader fetch an arbitrary URL. The manifest's own
  ``allow_external`` field, from older versions, is read and ignored: a manifest cannot waive
  its own check;
- ``version`` is one this code reads (1: written before content-addressed shard names, still
  read; 2: current). Another version is refused with a message to re-run ``flowpp prepare``.

``check_fits_model`` refuses, before training starts, a manifest whose images the model
cannot take (image size, channels, bits), naming the URL, the field and both values.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationError

from orchestrator.core import storage
from orchestrator.core.errors import UserError, validation_problems
from orchestrator.core.strict import Strict

if TYPE_CHECKING:
    from orchestrator.config import JobSpec

VERSION = 2
_HEX64 = r"^[0-9a-f]{64}$"


class ManifestError(UserError, ValueError):
    """A manifest that cannot be used: every problem, each with the URL and the field's path."""

    def __init__(self, url: str, problems: list[str]):
        self.url, self.problems = url, problems
        if len(problems) == 1:
            super().__init__(f"{url}: {problems[0]}")
        else:
            lines = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"{url}: {len(problems)} problem(s) in the manifest:\n{lines}")


class ShardEntry(Strict):
    index: int = Field(ge=0)
    """Position in ``shards``."""
    url: str = Field(min_length=1)
    """Relative to the manifest's folder (an absolute URL only with ``allow_external``)."""
    num_samples: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=_HEX64)
    num_inputs: int | None = Field(None, ge=0)
    """Input images that went into the shard, skipped ones included (version 2)."""
    content: str | None = Field(None, pattern=_HEX64)
    """sha256 over the options and every input image's digest: what decides a shard is current."""
    head: str | None = Field(None, pattern=_HEX64)
    """Digest of the shard's first input image, where a re-run looks for it (version 2)."""
    first_item: int | None = Field(None, ge=0)
    """Version 1 only: the shard's first item in read order."""
    last_item: int | None = Field(None, ge=-1)


class DemoInfo(Strict):
    """Where a ``demo`` split's patches come from (``sources.demo_summary``)."""

    photos: dict[str, int]
    """Patches cut from each photograph of this split."""
    scales: dict[str, int]
    """Patches per downsampling factor (a crop of ``size * k`` pixels, box-downsampled by k)."""
    flipped: int = Field(0, ge=0)
    other_split_photos: list[str]
    """The photographs the other split may draw from, which this split never does."""


class SourceInfo(Strict):
    kind: str
    inputs: list[str] = Field(default_factory=list)
    dataset: str = "?"
    holdout: float | None = Field(None, ge=0, le=1)
    """Share of a split-less input held out for ``valid`` by a hash of each image's name."""
    holdout_taken: tuple[int, int] | None = None
    """(images this split took, images in the split-less input) under that holdout."""
    demo: DemoInfo | None = None


class Skipped(Strict):
    count: int = Field(0, ge=0)
    examples: list[str] = Field(default_factory=list)


class Manifest(Strict):
    version: Literal[1, 2]
    fingerprint: str = ""
    split: str
    source: SourceInfo
    format: Literal["png", "raw"]
    image_size: int = Field(ge=1)
    channels: int = Field(3, ge=1)
    bits: int = Field(8, ge=1, le=8)
    """Bits per pixel value in the shards (a 5-bit model reduces 8-bit pixels as it reads them)."""
    num_samples: int = Field(ge=0)
    num_shards: int = Field(ge=0)
    total_bytes: int = Field(ge=0)
    skipped: Skipped = Field(default_factory=Skipped)
    allow_external: bool = False
    """Ignored (older manifests set it): only the reader may allow shards outside the folder."""
    shards: list[ShardEntry]


def base_of(url: str) -> str:
    """The folder of a manifest URL, which its relative shard URLs are under."""
    return url.rsplit("/", 1)[0] if "/" in url else ""


def _inside(base: str, shard_url: str) -> bool:
    rel = shard_url
    if "://" in shard_url or shard_url.startswith("/"):
        if not base or not shard_url.startswith(base.rstrip("/") + "/"):
            return False
        rel = shard_url[len(base.rstrip("/")) + 1 :]
    parts = rel.split("/")
    return "\\" not in rel and all(p not in ("", "..") for p in parts)


MIN_SAMPLE_BYTES = 1024
"""The least a sample takes in a tar shard: a 512-byte member header and one 512-byte block."""

EXTERNAL_SCHEMES = ("s3", "s3a", "file")
"""Where shards outside the manifest's folder may be, when the reader allows it."""


def _external_ok(shard_url: str) -> bool:
    return storage.protocol_of(shard_url) in EXTERNAL_SCHEMES and ".." not in shard_url.split("/")


def _problems(m: Manifest, url: str, allow_external: bool = False) -> list[str]:
    out = []
    totals = {
        "num_samples": sum(s.num_samples for s in m.shards),
        "num_shards": len(m.shards),
        "total_bytes": sum(s.bytes for s in m.shards),
    }
    for name, want in totals.items():
        if getattr(m, name) != want:
            out.append(f"{name}: {getattr(m, name)}, but the shards add up to {want}")
    for i, s in enumerate(m.shards):
        if s.index != i:
            out.append(f"shards.{i}.index: {s.index}, expected its position {i}")
        if s.num_samples * MIN_SAMPLE_BYTES > s.bytes:
            out.append(f"shards.{i}.num_samples: {s.num_samples} samples cannot fit in {s.bytes} bytes "
                       f"(a sample takes {MIN_SAMPLE_BYTES} bytes of tar at least)")  # fmt: skip
        if not s.url.isprintable():  # prepare never writes one; in a log line it could forge another
            out.append(f"shards.{i}.url: {s.url!r} holds a character that does not print (a newline, an escape)")
            continue
        if _inside(base_of(url), s.url) or (allow_external and _external_ok(s.url)):
            continue
        why = (
            "only s3:// and file:// shards may lie elsewhere"
            if allow_external
            else "the job spec's data.allow_external_shards lets shards lie elsewhere; a manifest cannot"
        )
        out.append(f"shards.{i}.url: {s.url!r} lies outside the manifest's folder {base_of(url) or '.'}/ ({why})")
    return out


def parse_manifest(data: bytes, url: str, allow_external: bool = False) -> Manifest:
    """The manifest in ``data`` (read from ``url``), or a ManifestError listing every problem;
    ``allow_external``: shards may also lie outside its folder, on s3:// or file://."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ManifestError(url, [f"not a valid manifest: not JSON ({exc})"]) from None
    if not isinstance(doc, dict):
        raise ManifestError(url, [f"not a valid manifest: a JSON {type(doc).__name__}, not an object"])
    try:
        m = Manifest.model_validate(doc)
    except ValidationError as exc:
        problems = validation_problems(exc)
        if any(e["loc"][:1] == ("version",) for e in exc.errors()):
            problems.append(f"this code reads manifest versions 1 and {VERSION}: re-run `flowpp prepare`")
        raise ManifestError(url, problems) from None
    problems = _problems(m, url, allow_external)
    if problems:
        raise ManifestError(url, problems)
    return m


def load_manifest(url: str, options: storage.StorageOptions | None = None, allow_external: bool = False) -> dict:
    """The validated manifest at ``url`` as a dict, its shard URLs made absolute."""
    m = parse_manifest(storage.read_bytes(url, options), url, allow_external)
    doc = m.model_dump(exclude_none=True)
    for shard in doc["shards"]:
        shard["url"] = storage.join(base_of(url), shard["url"])
    return doc


def check_fits_model(manifest: dict, url: str, *, image_size: int, channels: int, num_bits: int) -> None:
    """Refuse a split whose images the model cannot take, naming the field and both values."""
    problems = []
    if manifest["image_size"] != image_size:
        problems.append(f"image_size: the manifest's is {manifest['image_size']}, the model's is {image_size}")
    if manifest.get("channels", 3) != channels:
        problems.append(f"channels: the manifest's is {manifest.get('channels', 3)}, the model's is {channels}")
    if manifest.get("bits", 8) < num_bits:
        problems.append(
            f"bits: the manifest's shards hold {manifest.get('bits', 8)}-bit pixels, "
            f"the model needs {num_bits}-bit ones"
        )
    if problems:
        raise ManifestError(url, problems)


def check_job_data(spec: JobSpec) -> None:
    """Both of a job's manifests, validated and checked against its model, before training."""
    cfg = spec.model.flow_config()
    opts = spec.storage.options()
    for split, url in (("train", spec.data.train), ("valid", spec.data.valid)):
        manifest = load_manifest(url, opts, spec.data.allow_external_shards)
        where = f"data.{split} {url} (model.preset {spec.model.preset})"
        check_fits_model(manifest, where, image_size=cfg.image_size, channels=cfg.channels, num_bits=cfg.num_bits)
