"""The MLflow UI of a short real training run, in headless Chromium (Debian's ``chromium``).

A real MLflow server on 127.0.0.1 (sqlite, artifacts proxied to the moto S3), one real
training job of the debug preset on 16x16 patches logging to it (two evaluations, so two sample
grids; system metrics every second), then the run's page as ``tracking.run_page`` links it,
on three tabs: the model metrics (the metric charts, and the sample grid drawn in its image
card), the system metrics (charts of CPU and memory) and a sample grid in the artifact viewer,
its step in its name. Chromium is driven over its DevTools protocol (``tests.browser``): each
page is read until what the test looks for is there, and a screenshot of it goes to
``$FLOWPP_SCREENSHOT_DIR`` (default: the test's tmp folder).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import yaml

from orchestrator import tracking
from tests.browser import render, text_has
from tests.jobs import tiny_job, write_job
from tests.mlflowfixtures import image_steps, run_train

pytestmark = pytest.mark.e2e


def page(url: str, screenshot: Path, profile: Path, expect: tuple[str, ...], ready: str | None = None) -> str:
    """The visible text and the HTML of ``url`` once every string of ``expect`` is there (and
    ``ready``, a script, says ok), with a screenshot. The UI is a React app that fetches after it
    loads, so the page is read again each second until then."""
    rendered = render(url, profile, screenshot, ready or text_has(expect))
    return rendered.text


SAMPLES_CARD = """(() => {
  // the samples card on the run page: its title, and the grid's <img> once loaded (a grey box before)
  const title = [...document.querySelectorAll("h4")].find(e => e.textContent.trim() === "samples");
  const img = [...document.querySelectorAll("img")].find(i => i.src.includes("samples%2Bstep%2B"));
  if (!title || !img || !img.complete || !img.naturalWidth) return JSON.stringify({ok: false});
  title.scrollIntoView({block: "center"});  // for the screenshot; the page's own scrolling is not the card's
  // the part of the picture drawn: its box, clipped by every scrolling or clipping box up to the card
  const box = img.getBoundingClientRect();
  let [l, t, r, b] = [box.left, box.top, box.right, box.bottom];
  for (let e = img.parentElement; e; e = e.parentElement) {
    const s = getComputedStyle(e);
    if (s.overflowX !== "visible" || s.overflowY !== "visible") {
      const c = e.getBoundingClientRect();
      [l, t, r, b] = [Math.max(l, c.left), Math.max(t, c.top), Math.min(r, c.right), Math.min(b, c.bottom)];
    }
    if (e.contains(title)) break;  // the card
  }
  const drawn = Math.max(0, r - l) * Math.max(0, b - t) / (box.width * box.height);
  return JSON.stringify({ok: true, drawn, width: box.width, height: box.height, natural: img.naturalWidth});
})()"""


def samples_card(url: str, screenshot: Path, profile: Path) -> dict:
    """How much of the sample grid MLflow's image card draws at its default size (``drawn``, 0 to 1)."""
    return render(url, profile, screenshot, SAMPLES_CARD).answer


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("FLOWPP_SCREENSHOT_DIR") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_run_page_shows_metric_charts_sample_grids_by_step_and_system_metrics(mlflow_server, tmp_path,  # noqa: F811
                                                                                  shots):  # fmt: skip
    """Also what the short run logs, checked before the browser (and where Chromium is missing):
    its grids by step, its system metrics and its resolved spec (a ``--set`` override, a
    ``${VAR}`` expanded, the password in the tracking URI masked)."""
    experiment = "ui-" + uuid.uuid4().hex[:8]
    password = "pw-" + uuid.uuid4().hex
    tree = tiny_job(
        tmp_path,
        scaling__num_workers=1,
        train__max_steps=30,
        train__log_every=5,
        train__checkpoint_every=20,
        train__eval_every=10,
        train__sample_grid=16,
        mlflow__tracking_uri=mlflow_server.uri.replace("http://", f"http://flowpp:{password}@"),
        mlflow__registered_model=experiment,
        mlflow__system_metrics_interval_s=1,
    )
    tree["mlflow"]["experiment"] = "${FLOWPP_TEST_EXPERIMENT}"
    path = write_job(tree, tmp_path / "job.yaml")
    out = run_train(path, tmp_path, "--set", "train.max_steps=20", env={"FLOWPP_TEST_EXPERIMENT": experiment})
    assert out.returncode == 0, out.stderr[-3000:]
    client = tracking.client_for(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    run_id = tracking.find_run(mlflow_server.uri, experiment, tree["name"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    link = tracking.run_page(mlflow_server.uri, exp.experiment_id, run_id)
    assert f"MLflow run page: {link}" in out.stderr  # the job prints the link it opens, without the password
    assert password not in out.stdout + out.stderr
    assert image_steps(client, run_id, "samples") == [0, 10, 20]  # the untrained model, then every evaluation
    assert not client.list_artifacts(run_id, "samples")  # no second copy as a plain artifact
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    (tmp_path / "dl").mkdir()
    text = Path(client.download_artifacts(run_id, "job.yaml", str(tmp_path / "dl"))).read_text()
    spec = yaml.safe_load(text)
    assert spec["train"]["max_steps"] == 20  # the --set override, not the file's 30
    assert spec["mlflow"]["experiment"] == experiment  # ${FLOWPP_TEST_EXPERIMENT}, expanded
    assert spec["mlflow"]["tracking_uri"] == mlflow_server.uri.replace("http://", "http://***@")
    assert password not in text

    if shutil.which("chromium") is None:
        pytest.skip("chromium not installed: apt-get install chromium (the run's checks above passed)")
    base, query = link.split("?")
    profile = tmp_path / "chromium"

    charts = ("train_bpd", "val_bpd", "images_per_s", "grad_norm", "samples", "Step")  # Step: an x axis drawn
    metrics = page(f"{base}/model-metrics?{query}", shots / "mlflow-model-metrics.png", profile, charts)
    assert "Model metrics" in metrics and "Model registry" in metrics  # the model-training view
    assert "Evaluation runs" not in metrics  # not the GenAI one
    for chart in charts:
        assert chart in metrics, chart
    # the grid itself is drawn in its card, at the card's default size: MLflow lists the run's
    # params above the picture, one a line, so a run with the whole spec as params hid it
    card = samples_card(f"{base}/model-metrics?{query}", shots / "mlflow-samples-card.png", profile)
    assert card["ok"], "the samples card never drew its grid"
    assert card["drawn"] >= 0.6 and card["width"] >= 200, card

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
