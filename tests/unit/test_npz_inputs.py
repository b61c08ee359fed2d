"""Downsampled-ImageNet ``.npz`` inputs that are not what they claim: each a one-line error naming
the file (they were tracebacks, or, for rows of the wrong width, silently wrong images)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.data.sources import CorruptInputError, iter_items
from tests.datafixtures import make_npz_batch

pytestmark = pytest.mark.unit


def _npy(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def items(path, size=64):
    return list(iter_items("npz", [path], split="train", size=size, shuffle=False))


@pytest.mark.parametrize(
    ("write", "says"),
    [
        (
            lambda p: np.savez(p, data=np.array([object()] * 2, dtype=object), labels=np.arange(2)),
            "is not a plain array",
        ),
        (lambda p: p.write_bytes(_npy(np.zeros((2, 12288), np.uint8))), "one array of shape (2, 12288)"),
        (
            lambda p: np.savez(p, data=np.zeros((4, 12288), np.uint8), labels=np.arange(3)),
            "'labels' has shape (3,) int64, expected (4,) integers",
        ),
        (
            lambda p: np.savez(p, data=np.zeros((4, 12000), np.uint8), labels=np.arange(4)),
            "rows of 12000 values are not 3 square planes",
        ),
        (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "not a readable .npz of arrays"),
    ],
    ids=["object array", "npy named npz", "labels shorter", "row width", "truncated"],
)
def test_a_bad_npz_is_one_line_naming_it(tmp_path, write, says):
    path = tmp_path / "train_data_batch_1.npz"
    write(path)
    with pytest.raises(CorruptInputError) as err:
        items(path)
    text = str(err.value)
    assert text.startswith(str(path)) and says in text and "\n" not in text, text


def test_a_good_npz_reads_every_row(tmp_path):
    path, images, labels = make_npz_batch(tmp_path / "train_data_batch_1.npz", 5)
    got = items(path)
    assert [i.label for i in got] == [int(x) for x in labels]
    np.testing.assert_array_equal(got[0].array, images[0])
