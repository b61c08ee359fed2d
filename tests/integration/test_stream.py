"""ShardStream against real shards, on local disk and on a moto S3 endpoint."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from orchestrator.core import storage
from orchestrator.data.prepare import PrepareOptions, prepare
from orchestrator.data.stream import ShardIntegrityError, ShardStream
from tests.datafixtures import make_vdo_tar, png_claiming

pytestmark = pytest.mark.integration


def _shards(tmp_path, out, n=60, shard_bytes=30_000, sopts=None, **kw):
    make_vdo_tar(tmp_path / "train_64x64.tar", n)
    prepare(
        PrepareOptions(source="vdo", input=str(tmp_path), output=out, shard_bytes=shard_bytes, progress=False, **kw),
        sopts,
    )
    return storage.join(out, "manifest.json")


def _keys(stream):
    return [k for b in stream for k in b["keys"]]


@pytest.fixture
def local_manifest(tmp_path):
    return _shards(tmp_path, str(tmp_path / "shards"))


@pytest.fixture
def s3_manifest(tmp_path, s3):
    return _shards(tmp_path, s3.url("imagenet", "train"), shard_bytes=200_000, sopts=s3.options), s3


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_uint8_images_with_equal_counts_per_rank(local_manifest, workers):
    streams = [
        ShardStream(local_manifest, batch_size=4, rank=r, world_size=3, num_workers=workers, shuffle_buffer=8)
        for r in range(3)
    ]
    batch = next(iter(streams[0]))
    assert batch["images"].shape == (4, 3, 64, 64) and str(batch["images"].dtype) == "torch.uint8"
    per_rank = [_keys(s) for s in streams[1:]]
    assert len(per_rank[0]) == len(per_rank[1]) == 20  # 60 // (3 * 4) * 4


def test_fewer_shards_than_ranks_times_workers(tmp_path):
    url = _shards(tmp_path, str(tmp_path / "s"), n=24, shard_bytes=10**9)  # one shard
    keys = [_keys(ShardStream(url, batch_size=2, rank=r, world_size=3, num_workers=2)) for r in range(3)]
    assert [len(k) for k in keys] == [8, 8, 8]
    assert len(set(sum(keys, []))) == 24


def test_epochs_differ_and_seeds_reproduce(local_manifest):
    s = ShardStream(local_manifest, batch_size=4, shuffle_buffer=16)
    e0, e1 = _keys(s), _keys(s)
    assert s.epoch == 2 and sorted(e0) == sorted(e1) and e0 != e1
    assert _keys(ShardStream(local_manifest, batch_size=4, shuffle_buffer=16, epoch=1)) == e1


def test_s3_stream_matches_local(tmp_path, s3_manifest):
    url, s3 = s3_manifest
    local = _shards(tmp_path, str(tmp_path / "local"), shard_bytes=200_000)
    remote = ShardStream(url, batch_size=4, num_workers=2, options=s3.options)
    assert _keys(remote) == _keys(ShardStream(local, batch_size=4, num_workers=2))


def _by_key(stream) -> dict:
    return {k: img for b in stream for k, img in zip(b["keys"], b["images"], strict=True)}


@pytest.mark.parametrize("workers", [0, 2])
def test_raw_shards_stream_the_same_images_as_png(tmp_path, workers):
    png = _shards(tmp_path, str(tmp_path / "png"))
    raw = _shards(tmp_path, str(tmp_path / "raw"), format="raw")
    a = _by_key(ShardStream(png, batch_size=4, num_workers=workers))
    b = _by_key(ShardStream(raw, batch_size=4, num_workers=workers))
    assert a.keys() == b.keys() and len(a) == 60
    for k in a:  # same pixels, channel-first: raw's HWC bytes are transposed as PNG decoding is
        assert torch.equal(a[k], b[k]), k
        assert b[k].shape == (3, 64, 64) and b[k].is_contiguous()


def test_a_raw_sample_of_the_wrong_size_is_substituted_and_counted(tmp_path, caplog):
    import io
    import tarfile

    url = _shards(tmp_path, str(tmp_path / "raw"), format="raw", shard_bytes=10**9)  # one shard
    path = tmp_path / "raw" / "train-000000.tar"
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    victim = next(m.name for m, _ in members if m.name.endswith(".raw"))
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            data = data[:100] if m.name == victim else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with caplog.at_level(logging.WARNING):
        s = ShardStream(url, batch_size=4)
        images = [b["images"] for b in s]
    assert sum(len(i) for i in images) == 60 and s.stats["corrupt_samples"] == 1
    assert any("corrupt sample" in r.message and "100 bytes" in r.message for r in caplog.records)


def test_a_bomb_a_foreign_format_and_a_bad_label_are_substituted_without_decoding(tmp_path, caplog):
    import io
    import tarfile
    import tracemalloc

    from orchestrator.data.stream import decode_image

    url = _shards(tmp_path, str(tmp_path / "png"), shard_bytes=10**9)  # one shard
    path = tmp_path / "png" / "train-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    pngs = [m.name for m, _ in members if m.name.endswith(".png")]
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, format="GIF")
    swap = {pngs[0]: png_claiming(13000, 13000), pngs[1]: gif.getvalue()}
    bad_label = pngs[2].removesuffix(".png") + ".cls"
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            data = swap.get(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
            if m.name == pngs[2]:  # in the sample's own group of members
                label = tarfile.TarInfo(bad_label)
                label.size = 4
                tar.addfile(label, io.BytesIO(b"cat!"))
    tracemalloc.start()
    with pytest.raises(ValueError, match="13000x13000 pixels, not the manifest's 64x64"):
        decode_image({"png": png_claiming(13000, 13000)}, "png", 64)
    assert tracemalloc.get_traced_memory()[1] < 50 * 2**20  # decoded, it would be 507 MB
    tracemalloc.stop()
    with caplog.at_level(logging.WARNING):
        s = ShardStream(url, batch_size=4)
        images = [b["images"] for b in s]
    assert sum(len(i) for i in images) == 60 and s.stats["corrupt_samples"] == 3
    said = " ".join(r.message for r in caplog.records if "corrupt sample" in r.message)
    assert "13000x13000 pixels" in said and "cannot identify image file" in said and "invalid literal" in said


def test_a_sample_key_with_a_newline_is_logged_quoted_on_one_line(tmp_path, caplog):
    """A shard's member named ``evil\\nINFO forged line.png`` (corrupt): the warning that substitutes
    it quotes the key, so the newline cannot forge a log line."""
    import io
    import tarfile

    url = _shards(tmp_path, str(tmp_path / "png"), n=8, shard_bytes=10**9)  # one shard
    path = tmp_path / "png" / "train-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == first:
                m.name, data = "evil\nINFO forged line.png", b"not a png"
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with caplog.at_level(logging.WARNING):
        assert sum(len(b["images"]) for b in ShardStream(url, batch_size=4)) == 8
    said = [r.getMessage() for r in caplog.records if "corrupt sample" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and "corrupt sample 'evil\\nINFO forged line'" in said[0], said


def test_a_first_batch_without_one_decodable_sample_names_its_shard(tmp_path):
    import io
    import tarfile

    from orchestrator.data.stream import NoDecodableSampleError

    url = _shards(tmp_path, str(tmp_path / "png"), n=8, shard_bytes=10**9)  # one shard
    path = tmp_path / "png" / "train-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            data = b"not a png" if m.name.endswith(".png") else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(NoDecodableSampleError, match=r"train-000000.tar: no sample of the first batch of rank 0"):
        next(iter(ShardStream(url, batch_size=4)))


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    from orchestrator.data.stream import ShardStream
    url, state_file, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = ShardStream(url, batch_size=4, num_workers=workers, shuffle_buffer=8)
    s.load_state_dict(json.load(open(state_file)))
    print(json.dumps([k for b in s for k in b["keys"]]))
""")


@pytest.mark.parametrize("stop_after", [1, 5, 11])
def test_resume_in_a_new_process_yields_exactly_the_uninterrupted_keys(local_manifest, tmp_path, stop_after):
    full = [b["keys"] for b in ShardStream(local_manifest, batch_size=4, num_workers=2, shuffle_buffer=8)]
    s = ShardStream(local_manifest, batch_size=4, num_workers=2, shuffle_buffer=8)
    it = iter(s)
    first = [next(it)["keys"] for _ in range(stop_after)]
    state = tmp_path / "state.json"
    state.write_text(json.dumps(s.state_dict()))
    out = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, local_manifest, str(state), "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    rest = json.loads(out.stdout)
    assert sum(first, []) + rest == sum(full, [])


def test_resume_on_more_ranks_reads_the_rest_exactly_once(local_manifest):
    s = ShardStream(local_manifest, batch_size=4, world_size=2, rank=0, num_workers=1, shuffle_buffer=8)
    it = iter(s)
    for _ in range(3):
        next(it)
    state = s.state_dict()
    # both old ranks had delivered 3 batches: rebuild what rank 1 delivered too
    s1 = ShardStream(local_manifest, batch_size=4, world_size=2, rank=1, num_workers=1, shuffle_buffer=8)
    it1 = iter(s1)
    done = [k for _ in range(3) for k in next(it1)["keys"]]
    s0 = ShardStream(local_manifest, batch_size=4, world_size=2, rank=0, num_workers=1, shuffle_buffer=8)
    it0 = iter(s0)
    done += [k for _ in range(3) for k in next(it0)["keys"]]
    rest, dropped = [], None
    for r in range(3):
        new = ShardStream(local_manifest, batch_size=2, world_size=3, rank=r, num_workers=2, shuffle_buffer=5)
        new.load_state_dict(state)
        rest += _keys(new)
        dropped = new.stats["dropped_samples"]
    assert len(rest) == len(set(rest)) and not set(rest) & set(done)
    assert 60 - len(done) - len(rest) == dropped < 3 * 2


def _global_steps(url, world, workers, strands, state=None):
    """Each step's keys over all ranks (rank after rank), from ``state`` on if given."""
    streams = [ShardStream(url, batch_size=8 // world, world_size=world, rank=r, num_workers=workers,
                           shuffle_buffer=8, strands=strands) for r in range(world)]  # fmt: skip
    for s in streams:
        if state:
            s.load_state_dict(state)
    per_rank = [[b["keys"] for b in s] for s in streams]
    return [sum((p[i] for p in per_rank), []) for i in range(len(per_rank[0]))]


def test_resumed_on_another_world_size_a_step_holds_the_images_it_would_have(local_manifest):
    """4 strands, a global batch of 8: 2 ranks that stop after 3 steps, resumed on 1 rank (and on 4,
    with another worker count), read on the same steps an uninterrupted run reads."""
    whole = _global_steps(local_manifest, 2, 2, 4)
    assert len(whole) == 60 // 8 and all(len(step) == 8 for step in whole)
    s = ShardStream(local_manifest, batch_size=4, world_size=2, rank=0, num_workers=2, shuffle_buffer=8, strands=4)
    it = iter(s)
    for _ in range(3):
        next(it)
    state = s.state_dict()
    assert _global_steps(local_manifest, 1, 0, 4, state) == whole[3:]
    assert _global_steps(local_manifest, 4, 1, 4, state) == whole[3:]


def test_state_from_another_dataset_is_refused(local_manifest, tmp_path):
    other = _shards(tmp_path / "o", str(tmp_path / "o" / "s"), n=20) if (tmp_path / "o").mkdir() is None else None
    state = ShardStream(other, batch_size=4).state_dict()
    with pytest.raises(ValueError, match="samples"):
        ShardStream(local_manifest, batch_size=4).load_state_dict(state)


# -- faults, against the S3 endpoint --------------------------------------------------------
def _put(s3, key, data):
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=data)


def _get(s3, key):
    return s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def test_corrupt_sample_is_skipped_counted_and_logged(s3_manifest, caplog):
    url, s3 = s3_manifest
    key = "imagenet/train/train-000000.tar"
    data = bytearray(_get(s3, key))
    at = data.find(b"IDAT")  # inside the first PNG's pixel data
    data[at + 8 : at + 40] = b"\xff" * 32
    _put(s3, key, bytes(data))
    with caplog.at_level(logging.WARNING):
        s = ShardStream(url, batch_size=4, options=s3.options)
        keys = _keys(s)
    assert len(keys) == 60 and s.stats["corrupt_samples"] == 1
    assert any("corrupt sample" in r.message and "train-000000.tar" in r.message for r in caplog.records)


def test_truncated_tar_skips_the_rest_of_that_shard_with_a_warning(s3_manifest, caplog):
    url, s3 = s3_manifest
    key = "imagenet/train/train-000001.tar"
    data = _get(s3, key)
    _put(s3, key, data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        streams = [ShardStream(url, batch_size=4, world_size=2, rank=r, options=s3.options) for r in range(2)]
        counts = [len(_keys(s)) for s in streams]
    assert counts == [28, 28]  # the step count did not change: no rank can hang
    lost = sum(s.stats["truncated_samples"] for s in streams)
    assert lost > 0 and sum(s.stats["truncated_shards"] for s in streams) >= 1
    assert any("truncated" in r.message and "train-000001.tar" in r.message for r in caplog.records)


def test_sha256_mismatch_is_an_error_when_verifying(s3_manifest):
    url, s3 = s3_manifest
    key = "imagenet/train/train-000000.tar"
    data = bytearray(_get(s3, key))
    data[-600] ^= 1  # one bit inside the tar padding: still a valid tar
    _put(s3, key, bytes(data))
    assert len(_keys(ShardStream(url, batch_size=4, options=s3.options))) == 60  # unnoticed without verify
    with pytest.raises(ShardIntegrityError, match=r"train-000000\.tar.*sha256"):
        _keys(ShardStream(url, batch_size=4, verify=True, options=s3.options))


def test_missing_object_and_bucket_name_the_url(s3_manifest):
    url, s3 = s3_manifest
    s3.client().delete_object(Bucket=s3.bucket, Key="imagenet/train/train-000001.tar")
    with pytest.raises(storage.StorageNotFoundError, match=r"s3://.*/train-000001\.tar"):
        _keys(ShardStream(url, batch_size=4, options=s3.options))
    with pytest.raises(storage.StorageNotFoundError, match="s3://no-such-bucket-xyz/m.json"):
        ShardStream("s3://no-such-bucket-xyz/m.json", batch_size=4, options=s3.options)
    with pytest.raises(storage.StorageNotFoundError, match="no-such-bucket-xyz"):
        prepare(
            PrepareOptions(source="demo", input="", output="s3://no-such-bucket-xyz/x", count=4, progress=False),
            s3.options,
        )


def test_init_images_are_train_init_batch_size_of_them_the_same_on_every_call(local_manifest, tmp_path):
    from orchestrator.config import validate
    from orchestrator.data.stream import load_manifest
    from orchestrator.training.loop import init_images
    from tests.jobs import tiny_job

    manifest = load_manifest(local_manifest)
    spec = validate(tiny_job(tmp_path, data__train=local_manifest, train__init_batch_size=24, scaling__num_workers=4))
    images = init_images(spec, manifest)
    assert images.shape == (24, 3, 64, 64) and images.dtype == torch.uint8
    assert torch.equal(images, init_images(spec, manifest))  # what rank 0 reads does not depend on the world
    everything = init_images(spec.model_copy(update={"train": spec.train.model_copy(update={"init_batch_size": 500})}),
                             manifest)  # fmt: skip
    assert everything.shape[0] == 60  # a split smaller than the init batch: all of it
