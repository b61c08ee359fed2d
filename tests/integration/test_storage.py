"""Transient S3 errors (through a fault-injecting proxy in front of moto) and credentials."""

import json
import logging

import pytest

from orchestrator import storage
from orchestrator.data.prepare import PrepareOptions, prepare
from orchestrator.data.stream import ShardStream
from tests.s3fixtures import ACCESS_KEY, SECRET, FaultProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def shards_on_s3(s3):
    prepare(
        PrepareOptions(
            source="demo",
            input="",
            output=s3.url("d", "train"),
            count=48,
            progress=False,
            shard_bytes=150_000,
        ),
        s3.options,
    )
    return s3


@pytest.mark.parametrize("mode", ["503", "500", "reset"])
def test_transient_errors_are_retried_with_backoff(shards_on_s3, mode, caplog):
    s3 = shards_on_s3
    proxy = FaultProxy(s3.endpoint, match=".tar", failures=2, mode=mode)
    try:
        opts = storage.StorageOptions(endpoint_url=proxy.endpoint, backoff_s=0.01, max_attempts=4)
        with caplog.at_level(logging.WARNING):
            keys = [
                k
                for b in ShardStream(s3.url("d", "train", "manifest.json"), batch_size=8, options=opts)
                for k in b["keys"]
            ]
    finally:
        proxy.close()
    assert len(keys) == 48 and proxy.injected == 2
    retries = [r.message for r in caplog.records if "transient error, retry" in r.message]
    # every injected failure was absorbed. Ours are logged; the HTTP client may absorb a dropped
    # connection (or s3fs a SlowDown) itself before our retry sees it.
    assert len(retries) <= 2 and all(".tar" in m for m in retries)
    if mode != "reset":
        assert retries


def test_persistent_transient_errors_end_in_a_clear_error(shards_on_s3):
    s3 = shards_on_s3
    proxy = FaultProxy(s3.endpoint, match=".tar", failures=10**6, mode="503")
    try:
        opts = storage.StorageOptions(endpoint_url=proxy.endpoint, backoff_s=0.01, max_attempts=3)
        stream = ShardStream(s3.url("d", "train", "manifest.json"), batch_size=8, options=opts)
        with pytest.raises(storage.StorageTransientError, match=r"s3://.*\.tar: still failing after 3 attempts"):
            next(iter(stream))
    finally:
        proxy.close()
    assert proxy.injected >= 3


def test_credentials_never_reach_logs_manifests_or_errors(s3, caplog, capsys, tmp_path):
    opts = storage.StorageOptions(endpoint_url=s3.endpoint, backoff_s=0.01, max_attempts=2)
    texts = []
    # our loggers at DEBUG, everything else at INFO (botocore's DEBUG dumps signed headers)
    with caplog.at_level(logging.INFO), caplog.at_level(logging.DEBUG, logger="orchestrator"):
        prepare(PrepareOptions(source="demo", input="", output=s3.url("c"), count=8, progress=False), opts)
        texts.append(json.dumps(json.loads(storage.read_bytes(s3.url("c", "manifest.json"), opts))))
        for bad in (s3.url("c", "missing.json"), "s3://no-such-bucket-q/m.json"):
            with pytest.raises(storage.StorageError) as err:
                ShardStream(bad, batch_size=2, options=opts)
            texts.append(str(err.value))
        # wrong credentials: the error must not echo them back
        wrong = storage.StorageOptions(endpoint_url=s3.endpoint, key=ACCESS_KEY, secret=SECRET + "-wrong")
        texts.append(repr(wrong))
    texts += [r.getMessage() for r in caplog.records]
    out = capsys.readouterr()
    texts += [out.out, out.err]
    blob = "\n".join(texts)
    assert SECRET not in blob and ACCESS_KEY not in blob
    assert "missing.json" in blob and "no-such-bucket-q" in blob  # the errors did name the URL


def test_redact_scrubs_known_secrets(aws_env):
    msg = f"signature mismatch for key {ACCESS_KEY} with {SECRET}"
    assert storage.redact(msg) == "signature mismatch for key *** with ***"
    opts = storage.StorageOptions(secret="inline-secret-value")
    assert "inline-secret-value" not in storage.redact("x inline-secret-value y", opts)
    assert "inline-secret-value" not in repr(opts)


def test_webdataset_s3_handler_reads_through_the_same_filesystem(shards_on_s3):
    import webdataset as wds

    s3 = shards_on_s3
    storage.register_webdataset_s3(s3.options)
    manifest = json.loads(storage.read_bytes(s3.url("d", "train", "manifest.json"), s3.options))
    urls = [s3.url("d", "train", sh["url"]) for sh in manifest["shards"]]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert len(keys) == 48
