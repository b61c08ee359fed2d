"""Promotion, rollback, sampling and evaluation against a real MLflow server.

The server has a sqlite backend and proxies artifacts to the moto S3 bucket; the
held-out shards live in the same bucket. Three real models of different quality
(untrained, 40 and 150 training steps at the debug preset) are logged once per module
and registered under a fresh model name in each test.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from flowpp import build_model, get_preset
from flowpp.distributed import data_dependent_init
from orchestrator import tracking
from orchestrator.cli import main as cli
from orchestrator.core.storage import StorageOptions
from orchestrator.data.prepare import PrepareOptions, prepare
from orchestrator.data.stream import ShardStream
from orchestrator.driver.promote import (
    CHAMPION,
    LOCK_TAG,
    PREVIOUS,
    EvalSettings,
    IncomparableError,
    PromotionError,
    break_lock,
    ensure_held,
    promote,
    promotion_lock,
    rollback,
)
from orchestrator.evaluation.evaluate import per_image_bpd
from orchestrator.tracking import ModelNotFoundError, TrackingUnavailableError, registry
from orchestrator.tracking.registry import ModelRegistry
from tests.integration.test_tracking import _no_pickle
from tests.s3fixtures import ACCESS_KEY, SECRET, FaultProxy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _train(model, stream, steps):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    done = 0
    while done < steps:
        for batch in stream:
            loss = model.bits_per_dim(batch["images"].long()).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break


@pytest.fixture(scope="module")
def world(mlflow_server):  # noqa: F811
    """Held-out shards in S3 and three logged models: weak (untrained), good (20 steps), best (20 more).

    On the 48 validation images good beats weak by 0.32 bits/dim (the margin is 0.17) and best beats
    good by 1.33 (margin 0.10), measured: the fewest steps that keep every comparison clear."""
    opts = StorageOptions(endpoint_url=mlflow_server.s3_endpoint, key=ACCESS_KEY, secret=SECRET)
    data = f"s3://{mlflow_server.bucket}/data"
    for split, count in (("train", 256), ("valid", 48)):
        out = f"{data}/{split}"
        prepare(PrepareOptions("demo", "", out, split=split, image_size=16, count=count, progress=False), opts)
    valid = f"{data}/valid/manifest.json"
    torch.manual_seed(0)
    model = build_model(get_preset("debug"))
    train = ShardStream(f"{data}/train/manifest.json", batch_size=16, options=opts, shuffle_buffer=64)
    data_dependent_init(model, next(iter(train))["images"].long())
    uris = {}
    client = tracking.mlflow_for(mlflow_server.uri).MlflowClient()
    exp = client.create_experiment("promote-" + uuid.uuid4().hex[:6])
    for name, steps in (("weak", 0), ("good", 20), ("best", 20)):  # steps added to the same model
        model.train()
        _train(model, train, steps)
        model.eval()
        run = client.create_run(exp, run_name=name).info.run_id
        if name == "best":  # as a training run logs it now: the spec as tags
            client.set_tag(run, "spec.data.valid", valid)
        else:  # as runs logged it before
            client.log_param(run, "data.valid", valid)
        client.log_metric(run, "val_bpd", per_image_bpd(model, valid, opts, max_images=16).mean)
        uris[name] = tracking.log_flow_model(mlflow_server.uri, run, model)
    run = client.create_run(exp, run_name="no-metric").info.run_id
    client.log_param(run, "data.valid", valid)
    uris["no_metric"] = tracking.log_flow_model(mlflow_server.uri, run, model)
    run = client.create_run(exp, run_name="elsewhere").info.run_id  # good, but its run names other data
    client.log_param(run, "data.valid", f"s3://{mlflow_server.bucket}/nowhere/manifest.json")
    client.log_metric(run, "val_bpd", 4.0)
    uris["elsewhere"] = tracking.log_flow_model(mlflow_server.uri, run, model)
    five_bit = build_model(dataclasses.replace(get_preset("debug"), num_bits=5))  # another kind of image
    run = client.create_run(exp, run_name="five-bit").info.run_id
    client.log_param(run, "data.valid", valid)
    client.log_metric(run, "val_bpd", 1.0)  # "better" by 3 bits/dim: on another scale
    uris["five_bit"] = tracking.log_flow_model(mlflow_server.uri, run, five_bit)
    return {"uris": uris, "valid": valid, "opts": opts, "server": mlflow_server}


@pytest.fixture
def reg(world, aws_env, monkeypatch):
    """A fresh registered model name, and helpers to add versions and read aliases."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", world["server"].s3_endpoint)
    uri, name = world["server"].uri, "flow-" + uuid.uuid4().hex[:8]
    client = tracking.mlflow_for(uri).MlflowClient()

    class Reg:
        def __init__(self):
            self.uri, self.name, self.client = uri, name, client

        def add(self, which: str) -> str:
            return tracking.register(uri, world["uris"][which], name, {})

        def alias(self, alias):
            try:
                return str(client.get_model_version_by_alias(name, alias).version)
            except Exception:
                return None

        def tags(self, version):
            return client.get_model_version(name, version).tags

        def promote(self, version=None, **kw):
            settings = EvalSettings(options=world["opts"], max_images=kw.pop("max_images", 0))
            return promote(uri, name, version, settings, log=lambda *_: None, **kw)

    return Reg()


def test_a_malformed_lock_tag_is_free_and_a_far_future_one_can_be_broken_on_the_record(reg, capsys):
    v1 = reg.add("good")
    reg.client.set_registered_model_tag(reg.name, LOCK_TAG, "not a lock at all")
    reg.promote(v1, max_images=4)  # a tag no promotion wrote: free
    assert reg.alias(CHAMPION) == v1
    stuck = "elsewhere:1:x:99999999999.000"  # a lease to the year 5138
    reg.client.set_registered_model_tag(reg.name, LOCK_TAG, stuck)
    assert break_lock(reg.uri, reg.name) == stuck
    model_tags = reg.client.get_registered_model(reg.name).tags
    assert LOCK_TAG not in model_tags and model_tags["promotion.lock_broken"].endswith(f"it was {stuck}")
    capsys.readouterr()
    assert cli(["promote", "--model", reg.name, "--rollback", "--break-lock", "--tracking-uri", reg.uri]) == 1
    out, err = capsys.readouterr()
    assert f"{reg.name}: no promotion lock is held" in out and "no @previous version to roll back to" in err


@pytest.mark.slow
def test_models_of_other_images_are_never_compared(reg):
    v1 = reg.add("good")
    reg.promote(v1)
    v2 = reg.add("five_bit")
    with pytest.raises(IncomparableError, match=rf"v{v2} and the champion v{v1} model other images \(num_bits 5 "
                       r"against 8\), so their bits/dim cannot be compared"):  # fmt: skip
        reg.promote(v2)
    assert reg.alias(CHAMPION) == v1 and "promotion.decision" not in reg.tags(v2)


@pytest.mark.slow
def test_a_candidate_is_scored_on_the_champions_data_never_its_own(reg, world):
    v1 = reg.add("good")
    reg.promote(v1, max_images=8)
    v2 = reg.add("elsewhere")  # its run names a manifest that does not exist: it is not read
    reg.promote(v2, max_images=8)
    assert reg.tags(v2)["promotion.data"] == world["valid"] == reg.tags(v1)["promotion.data"]


@pytest.mark.slow
def test_first_candidate_is_promoted_then_a_worse_one_is_refused(reg):
    v1 = reg.add("good")
    first = reg.promote(v1)
    assert first.promote and reg.alias(CHAMPION) == v1 and reg.alias(PREVIOUS) is None
    v2 = reg.add("weak")
    worse = reg.promote(v2)
    assert not worse.promote and worse.gain < 0
    assert "not better" in worse.reason
    assert reg.alias(CHAMPION) == v1
    # the figures are recorded on both versions, from the same images
    cand, champ = reg.tags(v2), reg.tags(v1)
    assert cand["promotion.decision"] == "refused" and cand["promotion.compared_with"] == v1
    assert champ["promotion.compared_with"] == v2
    assert float(cand["promotion.bpd"]) > float(champ["promotion.bpd"])
    assert cand["promotion.images"] == champ["promotion.images"] == "48"
    assert cand["promotion.data"] == champ["promotion.data"]


@pytest.mark.slow
def test_a_better_candidate_is_promoted_and_rollback_restores_the_previous(reg):
    v1, v2 = reg.add("weak"), reg.add("best")
    reg.promote(v1)
    better = reg.promote(v2)
    assert better.promote and better.gain > better.margin > 0
    assert (reg.alias(CHAMPION), reg.alias(PREVIOUS)) == (v2, v1)
    assert rollback(reg.uri, reg.name, log=lambda *_: None) == v1
    assert (reg.alias(CHAMPION), reg.alias(PREVIOUS)) == (v1, None)
    assert "promotion.rolled_back" in reg.tags(v2)
    with pytest.raises(PromotionError, match="no @previous"):
        rollback(reg.uri, reg.name, log=lambda *_: None)


@pytest.mark.slow
def test_a_tie_within_the_margin_is_refused(reg):
    v1, v2 = reg.add("good"), reg.add("good")  # the same weights: a difference of exactly 0
    reg.promote(v1)
    tie = reg.promote(v2)
    assert not tie.promote and tie.gain == 0.0
    assert reg.alias(CHAMPION) == v1
    # a real gain that a stated margin swallows is refused as well
    v3 = reg.add("best")
    wide = reg.promote(v3, margin=50.0)
    assert not wide.promote and 0 < wide.gain < 50.0 and reg.alias(CHAMPION) == v1


@pytest.mark.slow  # its fixture trains and logs five models
def test_missing_metric_and_missing_version_are_clear_errors(reg):
    v1 = reg.add("no_metric")
    with pytest.raises(PromotionError, match=rf"version {v1} has no val_bpd"):
        reg.promote(v1)
    with pytest.raises(ModelNotFoundError, match="has no version 99"):
        reg.promote("99")
    with pytest.raises(ModelNotFoundError, match="does not exist or has no versions"):
        promote(reg.uri, "never-registered-" + uuid.uuid4().hex[:6], log=lambda *_: None)
    assert reg.alias(CHAMPION) is None


@pytest.mark.slow  # its fixture trains and logs five models
def test_dry_run_changes_nothing(reg, capsys):
    v1 = reg.add("good")
    assert cli(["promote", "--model", reg.name, "--version", v1, "--dry-run", "--tracking-uri", reg.uri]) == 0
    assert "would promote" in capsys.readouterr().out
    assert reg.alias(CHAMPION) is None and "promotion.decision" not in reg.tags(v1)


@pytest.mark.slow
def test_concurrent_promotions_leave_consistent_aliases(reg):
    v1, v2, v3 = reg.add("weak"), reg.add("good"), reg.add("best")
    reg.promote(v1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": reg.uri}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "promote", "--model", reg.name, "--version", v],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for v in (v2, v3)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert set(codes) <= {0, 3}, outs
    assert reg.alias(CHAMPION) == v3, outs  # the best wins whatever the order
    t2, t3 = reg.tags(v2), reg.tags(v3)
    if t2["promotion.decision"] == "promoted":  # v2 went first: v3 was re-compared with v2, not v1
        assert t3["promotion.compared_with"] == v2 and reg.alias(PREVIOUS) == v2
    else:  # v3 went first: v2 was then compared with v3 and refused
        assert t2["promotion.compared_with"] == v3 and reg.alias(PREVIOUS) == v1
    assert LOCK_TAG not in reg.client.get_registered_model(reg.name).tags


@pytest.mark.slow
def test_sample_and_evaluate_load_the_registered_model_without_pickle(reg, world, tmp_path, capsys, monkeypatch):
    reg.promote(reg.add("best"))
    model = f"models:/{reg.name}@champion"
    _no_pickle(monkeypatch)
    out = tmp_path / "grid.png"
    assert cli(["sample", "--model", model, "-n", "9", "--out", str(out), "--tracking-uri", reg.uri]) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (3 * 16, 3 * 16)
    args = ["evaluate", "--model", model, "--data", world["valid"], "--iw-samples", "3", "--tracking-uri", reg.uri]
    assert cli(args) == 0
    lines = capsys.readouterr().out.splitlines()
    elbo = float(next(line for line in lines if "dequantization bound" in line).split()[1])
    iw = float(next(line for line in lines if "importance-weighted" in line).split()[1])
    assert 0 < iw <= elbo + 0.05  # the tighter bound, up to the noise of 3 samples


@pytest.mark.slow
def test_an_mlflow_error_is_never_taken_for_no_champion(reg, world, monkeypatch):
    """The alias lookup fails (503 through a proxy) while the rest of MLflow answers: no promotion."""
    v1, v2 = reg.add("good"), reg.add("best")
    reg.promote(v1)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)  # the project sets it
    monkeypatch.setattr(registry, "RETRY_BUDGET_S", 2.0)  # retried within it, then given up
    proxy = FaultProxy(reg.uri, match="registered-models/alias", failures=10**6, mode="503")
    try:
        settings = EvalSettings(options=world["opts"])
        started = time.monotonic()
        with pytest.raises(TrackingUnavailableError) as err:
            promote(proxy.endpoint, reg.name, v2, settings, log=lambda *_: None)
        assert time.monotonic() - started < 2.0 + 10.0  # the budget and one HTTP timeout at most
    finally:
        proxy.close()
    assert proxy.injected >= 2
    assert f"{reg.name}: reading @champion failed at the MLflow server {proxy.endpoint}" in str(err.value)
    assert reg.alias(CHAMPION) == v1 and "promotion.decision" not in reg.tags(v2)
    # only MLflow's own "not set" answer means there is no champion
    assert ModelRegistry(reg.uri, reg.name).alias("never-set") is None


@pytest.mark.slow
def test_a_promotion_rides_out_transient_server_errors_within_its_budget(reg, world, monkeypatch, caplog):
    """MLflow's own retries are off (the project's budget is the one policy): a registry call that
    meets a few 503s (an overloaded server, a database busy with a concurrent promotion) is retried."""
    v1, v2 = reg.add("good"), reg.add("best")
    reg.promote(v1)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)  # the project sets it
    proxy = FaultProxy(reg.uri, match="registered-models/alias", failures=3, mode="503")
    try:
        settings = EvalSettings(options=world["opts"])
        with caplog.at_level("WARNING"):
            decision = promote(proxy.endpoint, reg.name, v2, settings, log=lambda *_: None)
    finally:
        proxy.close()
    assert proxy.injected == 3 and decision.promote
    assert (reg.alias(CHAMPION), reg.alias(PREVIOUS)) == (v2, v1)
    assert "MLflow failed (attempt 1), retrying" in caplog.text


@pytest.mark.slow
def test_promoting_a_version_whose_artifacts_are_gone_from_s3_is_one_clear_line(mlflow_server, capsys):  # noqa: F811
    import boto3

    uri, name = mlflow_server.uri, "gone-" + uuid.uuid4().hex[:8]
    client = tracking.client_for(uri)
    exp = client.create_experiment(name)
    run = client.create_run(exp).info.run_id
    version = tracking.register(uri, tracking.log_flow_model(uri, run, build_model(get_preset("debug"))), name,
                                {"val_bpd": "6.0"})  # fmt: skip
    s3 = boto3.client("s3", endpoint_url=mlflow_server.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET)  # fmt: skip
    listed = s3.list_objects_v2(Bucket=mlflow_server.bucket, Prefix=f"mlflow/{exp}/")
    assert listed.get("Contents"), "the model's artifacts were not where the server puts them"
    for obj in listed["Contents"]:  # the artifact store lost this experiment's files
        s3.delete_object(Bucket=mlflow_server.bucket, Key=obj["Key"])
    args = ["promote", "--model", name, "--version", version, "--data", "file:///nowhere/manifest.json"]
    code = cli([*args, "--tracking-uri", uri])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("flowpp ")]
    assert code == 1 and "Traceback" not in err and "StopIteration" not in err, err
    assert len(lines) == 1 and f"models:/{name}/{version}" in lines[0], err
    assert "weights.safetensors" in lines[0] or "config.json" in lines[0] or "MLmodel" in lines[0], lines[0]
    assert ModelRegistry(uri, name).alias(CHAMPION) is None


@pytest.fixture
def bare_registry(mlflow_server):  # noqa: F811
    """A registered model with no versions: all the lock needs."""
    name = "lock-" + uuid.uuid4().hex[:8]
    tracking.client_for(mlflow_server.uri).create_registered_model(name)
    return ModelRegistry(mlflow_server.uri, name)


@pytest.mark.slow
def test_the_lock_is_renewed_while_its_holder_outlasts_the_lease(bare_registry):
    reg = bare_registry
    with promotion_lock(reg, lease_s=3.0, settle_s=0.1) as lease:
        first = reg.tags()[LOCK_TAG]
        time.sleep(7.0)  # a re-score that outlasts the lease more than twice over
        renewed = reg.tags()[LOCK_TAG]
        assert renewed.rsplit(":", 1)[0] == first.rsplit(":", 1)[0] == lease.owner
        assert float(renewed.rsplit(":", 1)[1]) > time.time() > float(first.rsplit(":", 1)[1])
        # a second promotion waits instead of taking a lease that would have expired
        waiting = promotion_lock(reg, lease_s=3.0, settle_s=0.1, timeout_s=1.0)
        with pytest.raises(PromotionError, match="another promotion has held the lock"), waiting:
            pass
        ensure_held(reg, lease)
    assert LOCK_TAG not in reg.tags()


@pytest.mark.slow
def test_of_promotions_racing_for_a_free_lock_one_holds_it_and_none_fails(mlflow_server):  # noqa: F811
    """Writers of one new tag at once: MLflow's SQL store inserts it twice and one insert fails (a
    UNIQUE constraint, seen as a concurrent promotion's exit 1). That writer lost the race: it waits."""
    import threading

    from orchestrator.core import lease as leases
    from orchestrator.driver.promote import TagStore

    failures, holders = [], []
    for _ in range(3):  # fresh models: the race is on the tag's first insert
        name = "race-" + uuid.uuid4().hex[:8]
        tracking.client_for(mlflow_server.uri).create_registered_model(name)
        reg = ModelRegistry(mlflow_server.uri, name)
        barrier, won = threading.Barrier(6), []

        def take(reg=reg, barrier=barrier, won=won) -> None:
            barrier.wait()
            try:
                won.append(leases.acquire(TagStore(reg), 60.0, settle_s=0.5))
            except leases.LeaseHeld:
                pass
            except Exception as exc:  # noqa: BLE001 - what the test is for
                failures.append(exc)

        threads = [threading.Thread(target=take) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        holders.append(len(won))
        for held in won:
            held.release()
    assert not failures, failures
    assert holders == [1, 1, 1]


@pytest.mark.slow
def test_only_the_owner_token_releases_the_lock(bare_registry):
    reg = bare_registry
    intruder = f"{uuid.uuid4().hex}:{time.time() + 600:.3f}"
    with promotion_lock(reg, lease_s=600, settle_s=0.1) as lease:
        reg.set_tag(LOCK_TAG, intruder)  # as if our lease had run out and another promotion took over
        with pytest.raises(PromotionError, match="the promotion lock was lost"):
            ensure_held(reg, lease)
    assert reg.tags()[LOCK_TAG] == intruder  # compare-and-delete left the other owner's lock alone
    reg.delete_tag(LOCK_TAG)
