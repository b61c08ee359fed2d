"""Small inputs in exactly the formats of the real sources, and shard helpers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` RGB pixels, with a few bytes of pixel
    data: all a decompression bomb needs (decoded it would be width * height * 3 bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 20000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def random_image(rng, size=64) -> np.ndarray:
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_vdo_tar(path: Path, n: int, size: int = 64, seed: int = 0, corrupt: tuple[int, ...] = ()) -> Path:
    """Like train_64x64.tar: a tar with a folder of unlabelled PNGs."""
    rng = np.random.default_rng(seed)
    folder = path.name.replace(".tar", "")
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            data = b"not a png at all" if i in corrupt else png_bytes(random_image(rng, size))
            info = tarfile.TarInfo(f"{folder}/{i:08d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_npz_batch(path: Path, n: int, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """Like train_data_batch_K.npz: data uint8 (n, 12288) as R, G, B planes; labels 1..1000."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    data = images.transpose(0, 3, 1, 2).reshape(n, 12288)
    labels = rng.integers(1, 1001, n)
    np.savez(path, data=data, labels=labels, mean=data.mean(0))
    return path, images, labels
