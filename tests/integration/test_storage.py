"""Transient S3 errors (through a fault-injecting proxy in front of moto) and credentials."""

import json
import logging
import re
import time

import pytest

from orchestrator.core import storage
from orchestrator.core.redact import redact
from orchestrator.data.prepare import PrepareOptions, prepare
from orchestrator.data.stream import ShardStream
from tests.s3fixtures import ACCESS_KEY, SECRET, FaultProxy, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(params=["file", "s3"])
def where(request, tmp_path):
    """(a URL prefix, its options) on local files or on the moto S3."""
    if request.param == "file":
        return f"file://{tmp_path}/cond", storage.StorageOptions()
    s3 = request.getfixturevalue("s3")
    return s3.url("cond"), s3.options


def test_conditional_writes_create_once_and_change_only_what_was_read(where):
    prefix, opts = where
    url = storage.join(prefix, "lock.json")
    assert storage.read_versioned(url, opts) is None
    v1 = storage.create_exclusive(url, b"first", opts)
    with pytest.raises(storage.PreconditionFailed):
        storage.create_exclusive(url, b"second", opts)
    assert storage.read_versioned(url, opts) == (b"first", v1)
    v2 = storage.replace_if(url, b"renewed", v1, opts)
    assert v2 != v1 and storage.read_versioned(url, opts) == (b"renewed", v2)
    with pytest.raises(storage.PreconditionFailed):
        storage.replace_if(url, b"stale writer", v1, opts)  # read before the renewal: refused
    with pytest.raises(storage.PreconditionFailed):
        storage.delete_if(url, v1, opts)
    assert storage.read_versioned(url, opts) == (b"renewed", v2)
    storage.delete_if(url, v2, opts)
    assert storage.read_versioned(url, opts) is None
    with pytest.raises(storage.PreconditionFailed):
        storage.replace_if(url, b"late", v2, opts)  # it vanished
    assert storage.honours_conditions(prefix, opts)


def test_of_racing_creates_exactly_one_wins(where):
    import threading

    prefix, opts = where
    url = storage.join(prefix, "race.json")
    barrier, results = threading.Barrier(8), []

    def take(i: int) -> None:
        barrier.wait()
        try:
            storage.create_exclusive(url, f"taker {i}".encode(), opts)
            results.append(i)
        except storage.PreconditionFailed:
            pass

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1
    assert storage.read_versioned(url, opts)[0] == f"taker {results[0]}".encode()


def test_a_local_holder_frozen_inside_its_compare_keeps_others_waiting_a_bounded_time(tmp_path, monkeypatch):
    """A process stopped while it holds a file's flock: a replace or delete waits ``LOCAL_LOCK_WAIT_S``
    for each try, within the retry budget, then fails naming the lock file; nothing changed."""
    import fcntl
    import os

    url = f"file://{tmp_path}/lock.json"
    opts = storage.StorageOptions(retry_budget_s=1.0)
    v1 = storage.create_exclusive(url, b"held", opts)
    monkeypatch.setattr(storage, "LOCAL_LOCK_WAIT_S", 0.3)
    frozen = os.open(f"{tmp_path}/lock.json.flock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(frozen, fcntl.LOCK_EX)  # another open file: it conflicts as another process's would
    try:
        for act in (lambda: storage.replace_if(url, b"new", v1, opts), lambda: storage.delete_if(url, v1, opts)):
            started = time.monotonic()
            with pytest.raises(Exception, match=r"lock\.json\.flock: held by another process for over 0.3 s"):
                act()
            assert 0.3 <= time.monotonic() - started < 1.0 + 0.3 + 2.0  # the budget, one wait, slack
    finally:
        os.close(frozen)
    assert storage.read_versioned(url, opts) == (b"held", v1)
    assert storage.read_versioned(url, opts)[1] != storage.replace_if(url, b"new", v1, opts)  # free again


def test_a_store_that_ignores_conditions_is_found_by_the_probe(s3):
    proxy = FaultProxy(s3.endpoint, match="", failures=0, strip_conditions=True)
    try:
        opts = storage.StorageOptions(endpoint_url=proxy.endpoint, backoff_s=0.01, max_attempts=3)
        assert not storage.honours_conditions(s3.url("cond"), opts)
        assert storage.honours_conditions(s3.url("cond"), s3.options)  # the store itself does
        assert [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket).get("Contents", [])] == []
    finally:
        proxy.close()


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


def _keys(s3, opts) -> list[str]:
    stream = ShardStream(s3.url("d", "train", "manifest.json"), batch_size=8, options=opts)
    return [k for b in stream for k in b["keys"]]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "retry_mode"), [("503", "standard"), ("500", "adaptive"), ("reset", "standard")])
def test_botocore_retries_a_transient_error_itself(shards_on_s3, mode, retry_mode, caplog):
    """No budget left to this module: only botocore's own retry (standard or adaptive) can absorb the faults."""
    s3 = shards_on_s3
    proxy = FaultProxy(s3.endpoint, match=".tar", failures=2, mode=mode)
    try:
        opts = storage.StorageOptions(endpoint_url=proxy.endpoint, max_attempts=3, retry_mode=retry_mode,
                                      retry_budget_s=0.0)  # fmt: skip
        with caplog.at_level(logging.WARNING):
            keys = _keys(s3, opts)
    finally:
        proxy.close()
    assert len(keys) == 48 and proxy.injected == 2
    assert not [r for r in caplog.records if "transient error, retry" in r.message]


def test_an_outage_longer_than_botocores_attempts_is_retried_within_the_budget(shards_on_s3, caplog):
    s3 = shards_on_s3
    proxy = FaultProxy(s3.endpoint, match=".tar", failures=6, mode="503")
    try:
        opts = storage.StorageOptions(endpoint_url=proxy.endpoint, max_attempts=2, backoff_s=0.01, retry_budget_s=30)
        with caplog.at_level(logging.WARNING):
            keys = _keys(s3, opts)
    finally:
        proxy.close()
    assert len(keys) == 48 and proxy.injected == 6
    retries = [r.message for r in caplog.records if "transient error, retry" in r.message]
    assert len(retries) == 3 and all(".tar" in m and "reduce your request rate" in m for m in retries)


def test_persistent_transient_errors_end_in_a_clear_error_once_the_budget_is_spent(shards_on_s3, caplog):
    s3 = shards_on_s3
    proxy = FaultProxy(s3.endpoint, match=".tar", failures=10**6, mode="503")
    try:
        opts = storage.StorageOptions(endpoint_url=proxy.endpoint, max_attempts=1, backoff_s=0.05, retry_budget_s=1.5)
        stream = ShardStream(s3.url("d", "train", "manifest.json"), batch_size=8, options=opts)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING), pytest.raises(storage.StorageTransientError) as err:
            next(iter(stream))
        spent = time.monotonic() - started
    finally:
        proxy.close()
    assert re.search(r"s3://.*\.tar: still failing after \d+ attempts over \d+\.\d s", str(err.value))
    assert not isinstance(err.value, storage.StorageUnreachableError)
    assert 1.5 <= spent < 10 and proxy.injected >= 3
    # full jitter: each delay is drawn below a cap that doubles, so they are not the caps themselves
    delays = [float(m) for m in re.findall(r"retry \d+ in (\d+\.\d+)s", caplog.text)]
    caps = [min(0.05 * 2**i, 10.0) for i in range(len(delays))]
    assert len(delays) >= 3 and all(d <= c + 0.005 for d, c in zip(delays, caps, strict=True))
    assert delays[:-1] != [round(c, 2) for c in caps[:-1]]


def test_an_endpoint_that_refuses_connections_is_reported_unreachable_not_missing(aws_env):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    opts = storage.StorageOptions(endpoint_url=endpoint, max_attempts=1, backoff_s=0.01, retry_budget_s=0.5)
    for call in (
        lambda: storage.check_bucket("s3://some-bucket/data/manifest.json", opts),
        lambda: storage.read_bytes("s3://some-bucket/data/manifest.json", opts),
        lambda: storage.object_size("s3://some-bucket/data/manifest.json", opts),
    ):
        with pytest.raises(storage.StorageUnreachableError) as err:
            call()
        text = str(err.value)
        assert f"the endpoint {endpoint} is unreachable" in text and "s3://some-bucket/data/manifest.json" in text
        assert "does not exist" not in text and not isinstance(err.value, storage.StorageNotFoundError)
        assert SECRET not in text and ACCESS_KEY not in text


def test_retry_defaults_are_botocores_standard_mode_with_a_minute_of_budget(tmp_path):
    from orchestrator.config import JobSpec
    from tests.jobs import tiny_job

    opts = storage.StorageOptions()
    assert opts.retry_budget_s >= 60
    config = opts.fsspec_kwargs("s3")["config_kwargs"]
    assert config["retries"] == {"mode": "standard", "total_max_attempts": 3}
    tree = tiny_job(tmp_path, storage__retry_budget_s=90, storage__retry_mode="adaptive")
    spec_opts = JobSpec.model_validate(tree).storage.options()
    assert (spec_opts.retry_budget_s, spec_opts.retry_mode) == (90, "adaptive")
    assert spec_opts.fsspec_kwargs("s3")["config_kwargs"]["retries"]["mode"] == "adaptive"
    assert JobSpec.model_validate(tiny_job(tmp_path)).storage.options().retry_budget_s >= 60


def test_credentials_never_reach_logs_manifests_or_errors(s3, caplog, capsys, tmp_path):
    opts = storage.StorageOptions(endpoint_url=s3.endpoint, backoff_s=0.01, max_attempts=2, retry_budget_s=1)
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
    assert redact(msg) == "signature mismatch for key *** with ***"
    opts = storage.StorageOptions(secret="inline-secret-value")
    assert "inline-secret-value" not in redact("x inline-secret-value y", opts.secrets())
    assert "inline-secret-value" not in repr(opts)


def test_webdataset_s3_handler_reads_through_the_same_filesystem(shards_on_s3):
    import webdataset as wds

    s3 = shards_on_s3
    storage.register_webdataset_s3(s3.options)
    manifest = json.loads(storage.read_bytes(s3.url("d", "train", "manifest.json"), s3.options))
    urls = [s3.url("d", "train", sh["url"]) for sh in manifest["shards"]]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert len(keys) == 48
