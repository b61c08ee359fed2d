"""The MLflow UI of a short real training run, in headless Chromium (Debian's ``chromium``).

A real MLflow server on 127.0.0.1 (sqlite, artifacts proxied to the moto S3), one real
training job of the debug preset on 16x16 patches logging to it (two evaluations, so two sample
grids; system metrics every second), then the run's page as ``tracking.run_page`` links it,
on three tabs: the model metrics (the metric charts and the sample grids' image chart), the
system metrics (charts of CPU and memory) and a sample grid in the artifact viewer, its step in
its name. Chromium renders each page for a virtual 30 s (the UI is a React app that fetches
after it loads), then prints its DOM and saves a screenshot into ``$FLOWPP_SCREENSHOT_DIR``
(default: the test's tmp folder).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from orchestrator import tracking
from tests.jobs import tiny_job, write_job
from tests.mlflowfixtures import image_steps, mlflow_server, run_train  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e


def page(url: str, screenshot: Path, profile: Path, expect: tuple[str, ...], attempts: int = 6) -> str:
    """The visible text of ``url`` once rendered (scripts and styles left out), the DOM after it, and a
    screenshot. Loaded again while some of ``expect`` is missing: a run of Chromium now and then ends
    its virtual time before the charts' code has arrived (about one run in four here)."""
    cmd = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={profile}", "--window-size=1600,1800", "--virtual-time-budget=60000",
           f"--screenshot={screenshot}", "--dump-dom", url]  # fmt: skip
    for _ in range(attempts):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and screenshot.is_file(), out.stderr[-2000:]
        text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", out.stdout, flags=re.S)
        text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))) + "\n" + out.stdout
        if all(e in text for e in expect):
            break
    return text


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("FLOWPP_SCREENSHOT_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_run_page_shows_metric_charts_sample_grids_by_step_and_system_metrics(mlflow_server, tmp_path,  # noqa: F811
                                                                                  shots):  # fmt: skip
    if shutil.which("chromium") is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    experiment = "ui-" + uuid.uuid4().hex[:8]
    tree = tiny_job(
        tmp_path,
        scaling__num_workers=1,
        train__max_steps=20,
        train__log_every=5,
        train__checkpoint_every=20,
        train__eval_every=10,
        train__sample_grid=16,
        mlflow__tracking_uri=mlflow_server.uri,
        mlflow__experiment=experiment,
        mlflow__registered_model=experiment,
        mlflow__system_metrics_interval_s=1,
    )
    out = run_train(write_job(tree, tmp_path / "job.yaml"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    client = tracking._client(mlflow_server.uri)
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    run_id = tracking.find_run(mlflow_server.uri, experiment, tree["name"])
    link = tracking.run_page(mlflow_server.uri, exp_id, run_id)
    assert f"MLflow run page: {link}" in out.stderr  # the job prints the link it opens
    assert image_steps(client, run_id, "samples") == [0, 10, 20]
    base, query = link.split("?")
    profile = tmp_path / "chromium"

    charts = ("train_bpd", "val_bpd", "images_per_s", "grad_norm", "samples", "Step")  # Step: an x axis drawn
    metrics = page(f"{base}/model-metrics?{query}", shots / "mlflow-model-metrics.png", profile, charts)
    assert "Model metrics" in metrics and "Model registry" in metrics  # the model-training view
    assert "Evaluation runs" not in metrics  # not the GenAI one
    for chart in charts:
        assert chart in metrics, chart

    charts = ("cpu_utilization_percentage", "system_memory_usage_megabytes", "Time")  # drawn against time
    system = page(f"{base}/system-metrics?{query}", shots / "mlflow-system-metrics.png", profile, charts)
    for chart in charts:
        assert chart in system, chart

    (grid,) = [f.path for f in client.list_artifacts(run_id, "images")
               if "+step+20+" in f.path and f.path.endswith(".png")]  # fmt: skip
    shown = f'<img alt="{grid}" src="blob:'
    viewer = page(f"{base}/artifacts/{grid}?{query}", shots / "mlflow-sample-grid.png", profile, (shown,))
    assert shown in viewer, "the grid is not shown"
    assert "samples+step+10+" in viewer and "samples+step+20+" in viewer  # every grid, by step
