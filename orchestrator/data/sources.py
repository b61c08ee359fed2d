"""Image sources for ``flowpp prepare``. Each yields ``Item``s in a deterministic order.

- ``vdo``: van den Oord's downsampled ImageNet, ``train_64x64.tar`` / ``valid_64x64.tar``
  or their extracted folders of PNGs (unlabelled).
- ``npz``: Chrabaszcz et al.'s batches, ``train_data_batch_1..10.npz`` / ``val_data.npz``:
  ``data`` uint8 (n, 12288) as R plane, G plane, B plane; ``labels`` 1..1000, kept as given.
- ``folder``: any folder of images, centre-cropped to a square and box-downsampled.
- ``demo``: patches cut at several scales from the photographs inside the scikit-image
  wheel (``DEMO_PHOTOS``), optionally mirrored; train and validation come from different
  photographs, and each manifest records which ones (``demo_summary``).

Order: each input's images are sorted by a hash of (seed, name), a shuffled order that an
added or removed image does not reorder, so that a re-run keeps the shards it did not touch.

Keys: the sanitised name without its extension; names that sanitise alike (``a b.png`` and
``a_b.png``, ``c.png`` and ``c.jpg``, ``é.png`` and ``è.png``) each get a short hash of the
full name appended, so that every image keeps its own key.

Splits: an input named for a split (``train_64x64.tar``, ``valid_64x64/``, ``val_data.npz``,
``train/``) is that split. An input that names none (a plain folder of images) is split
deterministically by a hash of each image's name: ``HOLDOUT`` of them go to ``valid``, the
rest to ``train``, whatever the seed, so the two never share an image.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from orchestrator.core.errors import UserError
from orchestrator.core.redact import printable

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SOURCES = ("vdo", "npz", "folder", "demo")
MAX_FILE_BYTES = 64 << 20
"""The largest input image file prepare reads (a photograph's JPEG is a few megabytes)."""
MAX_INPUT_PIXELS = 8192 * 8192
"""The most pixels an input image may claim (a 64-megapixel photograph); its header is read first."""
HOLDOUT = 0.05
"""Share of a split-less input's images (by a hash of the name) that is the ``valid`` split."""
_SPLIT_WORDS = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid"}

# The photographs inside scikit-image's wheel (skimage/data) that need no download, split by
# photograph: validation is two colour photographs that training never sees. The synthetic images
# (chessboard, color wheel, logo, phantom, horse silhouette) and the tiny animations are left out.
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
DEMO_GREY = (
    "brick.png",
    "camera.png",
    "cell.png",
    "clock_motion.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "microaneurysms.png",
    "moon.png",
    "page.png",
    "text.png",
)
"""The grey photographs: training only, and only with ``grey`` (``flowpp prepare demo --grey``),
stored as three equal channels. They are off by default: with them, 11 of the 18 training
photographs are grey, and a model that learns from them that its channels are equal scores
the colour validation photographs worse: after 500 steps of jobs/demo-long.yaml, 5.13 bits/dim
with them and 4.17 without (PNG: 4.10)."""
DEMO_SCALES = (1, 2, 3, 4)
"""A demo patch is a crop of ``size * k`` pixels box-downsampled by ``k``, with ``k`` drawn from
the scales the photograph is large enough for (ImageNet 64x64 is downsampled too)."""


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
    name: str = ""
    """The image's name inside its input (relative path, tar member, ``file.npz[i]``): it
    decides the order and, for a split-less input, the split."""
    label: int = -1
    data: bytes | None = None
    """Encoded image bytes (PNG, JPEG, ...) as found in the source, or None if ``array`` is set."""
    array: np.ndarray | None = None
    """(H, W, 3) uint8 pixels, for sources that store raw pixels."""

    def digest(self) -> bytes:
        """sha256 of everything that goes into this image's sample: key, name, label, pixels."""
        h = hashlib.sha256(f"{self.key}\0{self.name}\0{self.label}\0".encode())
        if self.array is not None:
            h.update(f"{self.array.shape}{self.array.dtype}".encode())
            h.update(np.ascontiguousarray(self.array).tobytes())
        else:
            h.update(self.data or b"")
        return h.digest()


@dataclass(frozen=True)
class SplitInputs:
    paths: list[Path]
    holdout: bool = False
    """True when the inputs name no split: each image's split comes from a hash of its name."""


Keep = Callable[[str], bool]


@dataclass
class Taken:
    """What the name-hash split of a split-less input kept for one split: ``taken`` of ``seen`` images."""

    seen: int = 0
    taken: int = 0

    def keep(self, split: str) -> Keep:
        def counted(name: str) -> bool:
            hit = in_split(name, split)
            self.seen += 1
            self.taken += hit
            return hit

        return counted


def _safe_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def unique_keys(names: list[str]) -> list[str]:
    """One key per name: the sanitised name without extension, plus a hash of the name where
    two names sanitise to the same key."""
    base = [_safe_key(str(PurePosixPath(n).with_suffix(""))) for n in names]
    clashes = Counter(base)
    tag = lambda n: hashlib.sha256(n.encode()).hexdigest()[:8]  # noqa: E731
    return [k if clashes[k] == 1 else f"{k}-{tag(n)}" for n, k in zip(names, base, strict=True)]


def _unit_hash(*parts) -> float:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_split(name: str, split: str) -> bool:
    """The split of an image of a split-less input: ``valid`` for a HOLDOUT share of names."""
    return (_unit_hash("holdout", name) < HOLDOUT) == (split == "valid")


def _ordered(names: list[str], seed: int | None) -> list[int]:
    """Indices of ``names`` in read order: sorted by name, or by a seeded hash of each name."""
    if seed is None:
        return sorted(range(len(names)), key=names.__getitem__)
    return sorted(range(len(names)), key=lambda i: (_unit_hash(seed, names[i]), names[i]))


def _images_in(path: Path) -> list[str]:
    """The image files under ``path``, by name. What only looks like one (a folder named ``x.png``,
    a FIFO, a dangling link) is skipped with a warning: never opened, so a FIFO cannot hang the
    read. A link that leads out of the folder is refused: ``--input`` names what is read."""
    import stat

    root, found = path.resolve(), []
    for p in path.rglob("*"):
        if p.suffix.lower() not in IMAGE_EXTS:
            continue
        try:
            mode = p.stat().st_mode  # through a link
        except OSError:
            log.warning("skipping %s: a link to nothing", printable(str(p)))
            continue
        if not stat.S_ISREG(mode):
            log.warning("skipping %s: not a regular file (a folder, a FIFO or a device)", printable(str(p)))
            continue
        if p.is_symlink() and not p.resolve().is_relative_to(root):
            raise UserError(f"{printable(str(p))}: a link out of the input folder (to {printable(str(p.resolve()))}); "
                            "copy the file in, or give its own folder as --input")  # fmt: skip
        found.append(p.relative_to(path).as_posix())
    return sorted(found)


def _files_items(path: Path, seed: int | None, keep: Keep) -> Iterator[Item]:
    names = [n for n in _images_in(path) if keep(n)]
    keys = unique_keys(names)
    for i in _ordered(names, seed):
        f = path / names[i]
        nbytes = f.stat().st_size
        if nbytes > MAX_FILE_BYTES:
            raise CorruptInputError(f"{printable(str(f))}: {nbytes:,} bytes, more than an image prepare reads "
                                    f"({MAX_FILE_BYTES:,})")  # fmt: skip
        yield Item(key=keys[i], ref=printable(str(f)), name=names[i], data=f.read_bytes())


def _tar_members(tar: tarfile.TarFile, path: Path, size: int) -> list[tarfile.TarInfo]:
    """The image members, each checked before it is read: no sparse member (10 KiB of tar that
    unpacks to gigabytes), none larger than an image of ``size`` pixels a side can be."""
    members = [m for m in tar if m.isreg() and m.name.lower().endswith(IMAGE_EXTS)]
    bound = max(1 << 20, 2 * 3 * size * size)
    for m in members:
        if m.issparse():
            raise CorruptInputError(f"{path}: member {printable(m.name)} is sparse (it would unpack to more than "
                                    "it holds); an image archive has none")  # fmt: skip
        if m.size > bound:
            raise CorruptInputError(f"{path}: member {printable(m.name)} is {m.size:,} bytes, more than a "
                                    f"{size}x{size} image can be ({bound:,})")  # fmt: skip
    first: dict[str, int] = {}
    for n, m in enumerate(members):
        if m.name in first:
            twice = f"member {printable(m.name)} appears twice (entries {first[m.name]} and {n})"
            raise CorruptInputError(f"{path}: {twice}")
        first[m.name] = n
    return members


def _vdo_items(path: Path, seed: int | None, keep: Keep, size: int) -> Iterator[Item]:
    if path.is_dir():
        yield from _files_items(path, seed, keep)
        return
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
        raise CorruptInputError(f"{path}: a compressed tar; decompress it first (images are read in shuffled "
                                "order, and each would decompress the archive again from its start)")  # fmt: skip
    try:
        with tarfile.open(path, "r:") as tar:
            members = [m for m in _tar_members(tar, path, size) if keep(m.name)]
            names = [m.name.removeprefix("./") for m in members]
            keys = unique_keys(names)
            for i in _ordered(names, seed):
                member = tar.extractfile(members[i])
                assert member is not None  # a regular file
                data = member.read()
                if len(data) != members[i].size:
                    raise EOFError(
                        f"member {printable(members[i].name)} ends after {len(data)} of its {members[i].size} bytes"
                    )
                yield Item(key=keys[i], ref=printable(f"{path}:{members[i].name}"), name=names[i], data=data)
    except (tarfile.TarError, EOFError, OSError) as exc:  # not a tar at all, or cut short
        raise CorruptInputError(f"{path}: not a readable tar ({type(exc).__name__}: {exc}); is it truncated?") from None


def _npz_items(path: Path, seed: int | None, keep: Keep, stem: str) -> Iterator[Item]:
    import zipfile

    try:
        loaded = np.load(path, allow_pickle=False)  # never a pickle: an object array is refused
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CorruptInputError(f"{path}: not a readable .npz of arrays: {type(exc).__name__}: {exc}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy (one array) under an .npz name
        raise CorruptInputError(f"{path}: one array of shape {loaded.shape}, not an .npz with 'data' and 'labels'")
    with loaded as npz:
        missing = [k for k in ("data", "labels") if k not in npz.files]
        if missing:
            raise CorruptInputError(f"{path}: missing array(s) {missing}; found {npz.files}")
        try:
            data, labels = npz["data"], npz["labels"]
        except ValueError as exc:  # an object array, whose reading would unpickle
            raise CorruptInputError(f"{path}: 'data' or 'labels' is not a plain array ({exc})") from None
    if data.ndim != 2 or data.shape[1] % 3 or data.dtype != np.uint8:
        raise CorruptInputError(f"{path}: 'data' has shape {data.shape} {data.dtype}, expected (n, 3*S*S) uint8")
    side = int(round((data.shape[1] // 3) ** 0.5))
    if 3 * side * side != data.shape[1]:  # 12000 wide is no square image: it was cut into wrong ones
        raise CorruptInputError(f"{path}: rows of {data.shape[1]} values are not 3 square planes (3*S*S)")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptInputError(f"{path}: 'labels' has shape {labels.shape} {labels.dtype}, expected "
                                f"({len(data)},) integers, one per row of 'data'")  # fmt: skip
    # rows are [R plane | G plane | B plane], each S*S row-major
    images = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    names = [f"{path.name}[{i}]" for i in range(images.shape[0])]
    rows = [i for i in range(images.shape[0]) if keep(names[i])]
    for j in _ordered([names[i] for i in rows], seed):
        i = rows[j]
        yield Item(
            key=f"{stem}_{i:07d}",
            ref=f"{path}[{i}]",
            name=names[i],
            label=int(labels[i]),
            array=np.ascontiguousarray(images[i]),
        )


def _demo_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo source needs scikit-image: pip install 'flowpp-orchestrator[demo]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@dataclass(frozen=True)
class DemoPatch:
    photo: str
    y: int
    x: int
    scale: int
    flip: bool


def demo_photos(split: str, grey: bool = False) -> tuple[str, ...]:
    """The photographs a demo split draws from: ``DEMO_PHOTOS``, plus ``DEMO_GREY`` for a
    training split with ``grey``."""
    return DEMO_PHOTOS[split] + (DEMO_GREY if grey and split == "train" else ())


def demo_plan(split: str, count: int, size: int, seed: int, flip: bool = False, grey: bool = False) -> list[DemoPatch]:
    """Where each demo patch of ``split`` comes from: the photographs take turns (each gives the
    same number of patches), the scale is drawn from ``DEMO_SCALES`` that fit the photograph,
    the position uniformly, and with ``flip`` half the patches are mirrored left to right."""
    photos = demo_photos(split, grey)
    shapes = {name: _demo_shape(name) for name in photos}
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    plan = []
    for i in range(count):
        name = photos[i % len(photos)]
        h, w = shapes[name]
        fits = [k for k in DEMO_SCALES if size * k <= min(h, w)]
        if not fits:
            raise UserError(f"demo photograph {name} ({w}x{h}) is smaller than one {size}x{size} patch")
        k = fits[int(rng.integers(len(fits)))]
        side = size * k
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        mirrored = bool(rng.integers(2)) if flip else False
        plan.append(DemoPatch(name, y, x, k, mirrored))
    return plan


def demo_summary(split: str, plan: list[DemoPatch]) -> dict:
    """What a demo split's manifest records: patches per photograph and per scale, the flips,
    and the photographs the other split may draw from (which this split never does)."""
    return {
        "photos": dict(Counter(p.photo for p in plan)),
        "scales": {str(k): n for k, n in sorted(Counter(p.scale for p in plan).items())},
        "flipped": sum(p.flip for p in plan),
        "other_split_photos": list(demo_photos("valid") if split == "train" else demo_photos("train", grey=True)),
    }


def _demo_shape(name: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(_demo_dir() / name) as im:
        return im.height, im.width


def _demo_items(plan: list[DemoPatch], size: int) -> Iterator[Item]:
    from PIL import Image

    photos = {}
    for name in dict.fromkeys(p.photo for p in plan):
        with Image.open(_demo_dir() / name) as im:
            photos[name] = np.asarray(im.convert("RGB"))
    for i, p in enumerate(plan):
        side = size * p.scale
        crop = Image.fromarray(photos[p.photo][p.y : p.y + side, p.x : p.x + side])
        patch = crop.resize((size, size), Image.Resampling.BOX)
        if p.flip:
            patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        key = f"{Path(p.photo).stem}_{i:06d}"
        yield Item(
            key=key,
            ref=f"skimage/data/{p.photo}@{p.y},{p.x},{side}{',flip' if p.flip else ''}",
            name=key,
            array=np.asarray(patch),
        )


def demo_count(split: str, count: int) -> int:
    """The demo's patches in ``split``: ``count``, or 4096 train / 512 valid for 0."""
    return count or (4096 if split == "train" else 512)


def own_split(path: Path) -> str | None:
    """The split an input's name declares (``train_64x64.tar``, ``val_data.npz``, ``valid/``), if any."""
    word = re.split(r"[_.\-]", path.name.lower(), maxsplit=1)[0]
    return _SPLIT_WORDS.get(word)


def _split_candidates(source: str, split: str) -> tuple[str, ...]:
    if source == "vdo":
        return tuple(f"{split}_{s}" for s in ("64x64.tar", "64x64", "32x32.tar", "32x32"))
    return (split, "val") if split == "valid" else (split,)


def _npz_batches(path: Path, split: str) -> list[Path]:
    if split == "train":
        names = sorted(path.glob("train_data_batch_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    else:
        names = sorted(path.glob("val_data*.npz"))
    if not names:
        raise InputNotFoundError(f"no {split} .npz batches under {path}")
    return names


def split_inputs(source: str, path: Path, split: str, whole: bool = False) -> SplitInputs:
    """The inputs of one split under ``path``: the file or folder named for it, else ``path``
    itself, split by a hash of each image's name (see HOLDOUT) if its name declares no split,
    or taken whole as ``split`` with ``whole``."""
    if not path.exists():
        raise InputNotFoundError(f"input {path} does not exist")
    if path.is_dir() and source == "npz":
        return SplitInputs(_npz_batches(path, split))
    if path.is_dir():
        found = [path / c for c in _split_candidates(source, split) if (path / c).exists()]
        if found:
            return SplitInputs(found[:1])
        others = [path / c for s in ("train", "valid") for c in _split_candidates(source, s) if (path / c).exists()]
        if others:
            want = _split_candidates(source, split)[0]
            raise InputNotFoundError(f"{path} holds {others[0].name} but no {split} split ({want})")
    declared = own_split(path)
    if declared is None:
        return SplitInputs([path], holdout=not whole)
    if declared != split:
        raise UserError(f"input {path} is the {declared} split by its name; give the {split} split's input")
    return SplitInputs([path])


def iter_items(
    source: str,
    inputs: list[Path],
    *,
    split: str = "train",
    count: int = 0,
    size: int = 64,
    seed: int = 0,
    shuffle: bool = True,
    holdout: bool = False,
    flip: bool = False,
    grey: bool = False,
    taken: Taken | None = None,
) -> Iterator[Item]:
    """Items of one split. ``shuffle`` orders each input's items by a hash of (seed, name) so
    that shards are not sorted by class or name (the stream shuffles shards and within chunks);
    ``holdout`` keeps only the images of ``split`` (by a hash of the name, see ``in_split``),
    counting them in ``taken``;
    ``flip`` mirrors half the demo's patches and ``grey`` adds its grey photographs (the demo
    source only)."""
    if source == "demo":
        yield from _demo_items(demo_plan(split, demo_count(split, count), size, seed, flip, grey), size)
        return
    if source not in ("vdo", "npz", "folder"):
        raise UserError(f"unknown source {source!r}; expected one of {SOURCES}")
    order = seed if shuffle else None
    keep: Keep = (taken or Taken()).keep(split) if holdout else (lambda name: True)
    stems = unique_keys([p.name for p in inputs])
    for path, stem in zip(inputs, stems, strict=True):
        if not path.exists():
            raise InputNotFoundError(f"input {path} does not exist")
        if source == "npz":
            yield from _npz_items(path, order, keep, stem)
        else:
            yield from _vdo_items(path, order, keep, size)


def _as_rgb(im, ref: str):
    """8-bit RGB pixels as the image shows them, or a refusal naming the image: turned upright by
    its EXIF orientation; 16-bit values scaled to 8 bits (not clipped to white); an alpha channel
    dropped only where every pixel is opaque. Float pixels have no one scale: refused."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("F", "I;16F"):
        raise CorruptInputError(f"{ref}: floating-point pixels ({im.mode}), whose scale is unknown; "
                                "convert the image to 8-bit first")  # fmt: skip
    if im.mode.startswith("I"):  # 16-bit (I;16, I;16B) or 32-bit integer grey, read as 16-bit
        values = np.asarray(im).astype(np.uint32)
        im = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() < 255:
            raise CorruptInputError(f"{ref}: transparent pixels (an alpha channel that is not all opaque); "
                                    "flatten the image onto a background first")  # fmt: skip
    return im.convert("RGB")


def decode(item: Item, size: int) -> np.ndarray:
    """(size, size, 3) uint8 pixels; folder images are centre-cropped and box-downsampled."""
    from PIL import Image

    if item.array is not None:
        arr = item.array
    else:
        try:
            with Image.open(io.BytesIO(item.data or b"")) as im:
                w, h = im.size  # from the header: a bomb is refused before any pixel is decoded
                if w * h > MAX_INPUT_PIXELS:
                    too_many = f"{w}x{h} pixels, more than prepare reads ({MAX_INPUT_PIXELS:,})"
                    raise CorruptInputError(f"{item.ref}: {too_many}: a decompression bomb, or no photograph")
                im.load()
                im = _as_rgb(im, item.ref)
                if im.size != (size, size):
                    w, h = im.size
                    s = min(w, h)
                    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
                    im = im.resize((size, size), Image.Resampling.BOX, box=box)
                arr = np.asarray(im)
        except CorruptInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            raise CorruptInputError(f"cannot decode {item.ref}: {type(exc).__name__}: {exc}") from None
    if arr.shape != (size, size, 3) or arr.dtype != np.uint8:
        raise CorruptInputError(f"{item.ref}: got pixels {arr.shape} {arr.dtype}, expected ({size}, {size}, 3) uint8")
    return arr
