"""Image sources for ``flowpp prepare``. Each yields ``Item``s in a deterministic order.

- ``vdo``: van den Oord's downsampled ImageNet, ``train_64x64.tar`` / ``valid_64x64.tar``
  or their extracted folders of PNGs (unlabelled).
- ``npz``: Chrabaszcz et al.'s batches, ``train_data_batch_1..10.npz`` / ``val_data.npz``:
  ``data`` uint8 (n, 12288) as R plane, G plane, B plane; ``labels`` 1..1000, kept as given.
- ``folder``: any folder of images, centre-cropped to a square and box-downsampled.
- ``demo``: 64x64 patches cut from the colour photographs inside the scikit-image
  wheel; train and validation come from different photographs.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SOURCES = ("vdo", "npz", "folder", "demo")

# Colour photographs shipped in scikit-image's wheel (skimage/data), split by photograph.
DEMO_PHOTOS = {
    "train": (
        "astronaut.png",
        "coffee.png",
        "hubble_deep_field.jpg",
        "ihc.png",
        "motorcycle_left.png",
        "motorcycle_right.png",
        "retina.jpg",
    ),
    "valid": ("chelsea.png", "rocket.jpg"),
}


class CorruptInputError(UserError, ValueError):
    """An input image could not be decoded; the message names the file."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A source's input file or folder does not exist; the message names it."""


@dataclass(frozen=True)
class Item:
    key: str
    """Unique sample key within the split (becomes the tar member stem)."""
    ref: str
    """Where it came from, for error messages: a file, or tar/npz path plus member."""
    label: int = -1
    data: bytes | None = None
    """Encoded image bytes (PNG, JPEG, ...) as found in the source, or None if ``array`` is set."""
    array: np.ndarray | None = None
    """(H, W, 3) uint8 pixels, for sources that store raw pixels."""


def _safe_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _shuffled(seq: list, rng: np.random.Generator | None) -> list:
    return seq if rng is None else [seq[i] for i in rng.permutation(len(seq))]


def _vdo_items(path: Path, rng=None) -> Iterator[Item]:
    if path.is_dir():
        for f in _shuffled(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS), rng):
            yield Item(key=_safe_key(str(f.relative_to(path).with_suffix(""))), ref=str(f), data=f.read_bytes())
        return
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar if m.isreg() and m.name.lower().endswith(IMAGE_EXTS)), key=lambda m: m.name)
        members = _shuffled(members, rng)
        for m in members:
            stem = m.name.rsplit(".", 1)[0].lstrip("./")
            member = tar.extractfile(m)
            assert member is not None  # a regular file
            yield Item(key=_safe_key(stem), ref=f"{path}:{m.name}", data=member.read())


def _npz_items(path: Path, rng=None) -> Iterator[Item]:
    with np.load(path) as npz:
        missing = [k for k in ("data", "labels") if k not in npz.files]
        if missing:
            raise CorruptInputError(f"{path}: missing array(s) {missing}; found {npz.files}")
        data, labels = npz["data"], npz["labels"]
    if data.ndim != 2 or data.shape[1] % 3:
        raise CorruptInputError(f"{path}: 'data' has shape {data.shape}, expected (n, 3*S*S)")
    side = int(round((data.shape[1] // 3) ** 0.5))
    # rows are [R plane | G plane | B plane], each S*S row-major
    images = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    stem = _safe_key(path.stem)
    for i in _shuffled(list(range(images.shape[0])), rng):
        yield Item(
            key=f"{stem}_{i:07d}",
            ref=f"{path}[{i}]",
            label=int(labels[i]),
            array=np.ascontiguousarray(images[i]),
        )


def _folder_items(path: Path, rng=None) -> Iterator[Item]:
    for f in _shuffled(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS), rng):
        yield Item(key=_safe_key(str(f.relative_to(path).with_suffix(""))), ref=str(f), data=f.read_bytes())


def _demo_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo source needs scikit-image: pip install 'flowpp-orchestrator[data]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _demo_items(split: str, count: int, size: int, seed: int) -> Iterator[Item]:
    from PIL import Image

    photos = []
    for name in DEMO_PHOTOS[split]:
        with Image.open(_demo_dir() / name) as im:
            photos.append((name, np.asarray(im.convert("RGB"))))
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    for i in range(count):
        name, img = photos[i % len(photos)]
        h, w, _ = img.shape
        side = int(rng.integers(size, min(h, w) // 2 + 1))  # random scale, at least 1:1
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        patch = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BOX)
        yield Item(
            key=f"{Path(name).stem}_{i:06d}",
            ref=f"skimage/data/{name}@{y},{x},{side}",
            array=np.asarray(patch),
        )


def split_inputs(source: str, path: Path, split: str) -> list[Path]:
    """The input files of one split under ``path`` (a file is taken as is)."""
    if path.is_file() or source in ("folder",):
        return [path]
    if source == "vdo":
        for cand in (f"{split}_64x64.tar", f"{split}_64x64", f"{split}_32x32.tar", f"{split}_32x32"):
            if (path / cand).exists():
                return [path / cand]
        return [path]
    if source == "npz":
        names = sorted(path.glob("train_data_batch_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        if split != "train":
            names = sorted(path.glob("val_data*.npz"))
        if not names:
            raise InputNotFoundError(f"no {split} .npz batches under {path}")
        return names
    return [path]


def iter_items(
    source: str,
    inputs: list[Path],
    *,
    split: str = "train",
    count: int = 0,
    size: int = 64,
    seed: int = 0,
    shuffle: bool = True,
) -> Iterator[Item]:
    """Items of one split. ``shuffle`` permutes each input's items with ``seed`` so that
    shards are not sorted by class or name (the stream shuffles shards and within chunks)."""
    if source == "demo":
        yield from _demo_items(split, count or (4096 if split == "train" else 512), size, seed)
        return
    reader = {"vdo": _vdo_items, "npz": _npz_items, "folder": _folder_items}.get(source)
    if reader is None:
        raise UserError(f"unknown source {source!r}; expected one of {SOURCES}")
    for n, path in enumerate(inputs):
        if not path.exists():
            raise InputNotFoundError(f"input {path} does not exist")
        yield from reader(path, np.random.default_rng([seed, n]) if shuffle else None)


def decode(item: Item, size: int) -> np.ndarray:
    """(size, size, 3) uint8 pixels; folder images are centre-cropped and box-downsampled."""
    from PIL import Image

    if item.array is not None:
        arr = item.array
    else:
        try:
            with Image.open(io.BytesIO(item.data or b"")) as im:
                im.load()
                im = im.convert("RGB")
                if im.size != (size, size):
                    w, h = im.size
                    s = min(w, h)
                    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
                    im = im.resize((size, size), Image.Resampling.BOX, box=box)
                arr = np.asarray(im)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            raise CorruptInputError(f"cannot decode {item.ref}: {type(exc).__name__}: {exc}") from None
    if arr.shape != (size, size, 3) or arr.dtype != np.uint8:
        raise CorruptInputError(f"{item.ref}: got pixels {arr.shape} {arr.dtype}, expected ({size}, {size}, 3) uint8")
    return arr
