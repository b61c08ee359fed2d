"""Elastic training and preemption on a multi-node ``ray.cluster_utils.Cluster`` (CPU, token auth,
every node on loopback).

One run meets all three (each cluster and worker group costs tens of seconds on 2 cores):

- a node lost mid-run leaves training going on fewer workers at the same global batch;
- a node added grows the group back;
- a node drained for preemption (Ray's drain API, with a deadline) gives a checkpoint at once;
  the run resumes from it on the nodes left, the restart counted as a preemption, not a failure;

and over each epoch every sample is trained exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from orchestrator.config import validate
from tests.integration.test_train_ray import job, registered_step, trace
from tests.rayauth import token_auth
from tests.rayfixtures import LOOPBACK, loopback

pytestmark = pytest.mark.integration

MAX_STEPS = 192  # eight epochs of 24 steps


def counted_steps(tmp_path: Path, ranks: int = 2) -> dict[int, list[dict]]:
    """Per step, the records of the attempt that counted (the last one to train it): for each rank
    below that attempt's world size, its latest record of the step."""
    records = [r for rank in range(ranks) for r in trace(tmp_path, rank) if "step" in r]
    out = {}
    for step in sorted({r["step"] for r in records}):
        at = [r for r in records if r["step"] == step]
        world = max(at, key=lambda r: r["time"])["world"]
        out[step] = [max((r for r in at if r["rank"] == rank), key=lambda r: r["time"]) for rank in range(world)]
    return out


def wait_for(condition, what: str, thread_alive, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline and thread_alive(), f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_run_rides_out_a_lost_node_a_new_node_and_a_preemption_at_the_same_global_batch(tmp_path, monkeypatch):
    """One elastic run ([1, 2] workers, eight epochs), on a head and one more node:

    1. the second node is lost without notice: training goes on at 1 worker (a failure);
    2. a new node joins: the group grows back to 2;
    3. that node is drained for preemption (4 s notice): a checkpoint at once; at the deadline the
       group restarts, the node is reclaimed, and training goes on on the head alone from that
       checkpoint, or a scheduled one after it (a preemption: with ``max_failures: 1`` spent on the
       lost node, a restart counted as a failure would end the run).

    At every step the two or one workers train on 8 images in all; over each epoch every image once.
    """
    import threading

    import ray
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2

    from orchestrator.driver.launch import run_training

    auth = token_auth(tmp_path)
    # Ray Train's controller takes in a report a rank each poll (every 2 s by default): at 1 s the
    # notice's checkpoint is surely registered within the short notice of a test
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    with loopback():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": LOOPBACK})
        second = cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        try:
            ray.init(address=cluster.address, _node_ip_address=LOOPBACK)
            spec = validate(elastic_job(tmp_path))
            box: dict = {}
            thread = threading.Thread(target=lambda: box.update(result=run_training(spec)))
            thread.start()
            records = lambda: [r for r in trace(tmp_path, 0) if "step" in r]  # noqa: E731
            wait_for(lambda: registered_step(tmp_path) >= 16, "a checkpoint at 2 workers", thread.is_alive)
            cluster.remove_node(second)  # 1. lost, its worker with it
            wait_for(lambda: any(r["world"] == 1 for r in records()), "training on at 1 worker", thread.is_alive)
            grown = len(records())
            spot = cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)  # 2. a new node
            wait_for(lambda: any(r["world"] == 2 for r in records()[grown:]), "2 workers again", thread.is_alive)
            gcs = ray._raylet.GcsClient(address=cluster.address)
            reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
            deadline = time.time() + 4.0  # 3. the cloud's notice
            accepted, why = gcs.drain_node(spot.node_id, reason, "spot reclaim (test)", int(deadline * 1000))
            assert accepted, why
            jit = lambda: (step := registered_step(tmp_path)) % 16 and step < MAX_STEPS  # noqa: E731 (not the last step's)
            wait_for(jit, "the just-in-time checkpoint", thread.is_alive)
            noticed = registered_step(tmp_path)
            time.sleep(max(0.0, deadline + 0.2 - time.time()))
            reclaimed = registered_step(tmp_path)  # the notice's checkpoint, or a scheduled one after it
            cluster.remove_node(spot)  # reclaimed at its deadline
            thread.join(timeout=600)
            result = box["result"]
            # its twin: the same spec, never interrupted, on the head alone (one worker throughout)
            twin = elastic_job(tmp_path / "twin")
            twin["data"].update(train=spec.data.train, valid=spec.data.valid)
            twin_result = run_training(validate(twin))
        finally:
            ray.shutdown()
            cluster.shutdown()
    auth.restore()
    assert result.error is None and result.metrics["step"] == MAX_STEPS
    assert 16 < noticed < MAX_STEPS and noticed % 16  # at the step the notice came, not on the schedule
    runs = list(dict.fromkeys(r["pid"] for r in records()))  # rank 0's processes: one a worker group
    first_step = {pid: next(r for r in records() if r["pid"] == pid) for pid in runs}
    worlds = [first_step[pid]["world"] for pid in runs]
    assert worlds == [2, 1, 2, 1], worlds  # lost node, new node, preemption
    assert noticed <= reclaimed <= first_step[runs[3]]["step"]  # resumed from the newest checkpoint
    steps = counted_steps(tmp_path)
    assert sorted(steps) == list(range(MAX_STEPS))  # no step lost
    assert all(sum(len(r["keys"]) for r in records) == 8 for records in steps.values())  # the global batch
    for epoch in (range(start, start + 24) for start in range(0, MAX_STEPS, 24)):  # each image once an epoch
        keys = Counter(k for s in epoch for r in steps[s] for k in r["keys"])
        assert len(keys) == 192 and set(keys.values()) == {1}, epoch
    # the same images at every step as the uninterrupted twin, and its weights within float sums
    assert twin_result.error is None and twin_result.metrics["step"] == MAX_STEPS
    twin_steps = counted_steps(tmp_path / "twin", ranks=1)
    assert {r["world"] for records in twin_steps.values() for r in records} == {1}
    for step, records in steps.items():
        assert [k for r in records for k in r["keys"]] == twin_steps[step][0]["keys"], step
    mine, its = final_weights(result), final_weights(twin_result)
    gap = max((mine[k] - its[k]).abs().max().item() for k in mine if mine[k].is_floating_point())
    print(f"largest difference from the uninterrupted twin's weights: {gap:.3g}")
    for k in mine:
        torch.testing.assert_close(mine[k], its[k], rtol=1e-4, atol=1e-5, msg=k)


def elastic_job(where: Path) -> dict:
    """[1, 2] workers, a global batch of 8 in micro-batches of 4, data and runs under ``where``.

    192 training images, 8 a step: 24 steps an epoch at any world size. Eight epochs: the group
    grows back after 50 to 80 steps on one worker, and the notice and its deadline (4 s, 40 steps at
    2 workers) must fall before the end. The scheduled checkpoints are every 16 steps: the notice's
    falls between them. A restart that first asks for a node just lost waits ``start_timeout_s``,
    then starts smaller.
    """
    where.mkdir(exist_ok=True)
    tree = job(where, max_steps=MAX_STEPS, checkpoint_every=16, eval_every=MAX_STEPS, log_every=4, micro_batch_size=4)
    tree["scaling"].update(num_workers=[1, 2], resize_check_s=1.0, max_failures=1, start_timeout_s=10,
                           preemption={"check_every_steps": 1, "poll_interval_s": 0.5})  # fmt: skip
    return tree


def final_weights(result) -> dict:
    """The model's tensors in a run's last checkpoint (state.pt holds tensors only)."""
    with result.checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / "state.pt", weights_only=True)["model"]
