"""Secrets: the allow-list of ${VAR} in a job YAML, the one redaction, the log filter, and what
leaves the process (MLflow params, job.yaml, the workers' train_loop_config, errors, submission)."""

from __future__ import annotations

import logging
import subprocess
import uuid

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import JobSpecError, headline_params, load_job, public_params, spec_tags, validate
from orchestrator.config import env as jobenv
from orchestrator.core.errors import FlowppError, UserError
from orchestrator.core.logs import setup_logging
from orchestrator.core.redact import RedactingFilter, is_secret_name, redact, redact_tree

pytestmark = pytest.mark.unit

FAKE = "fake-" + uuid.uuid4().hex  # distinctive: a leak is a substring search
GOOD = "name: t\ndata: {train: s3://b/train/manifest.json, valid: s3://b/valid/manifest.json}\n"


def _write(tmp_path, text):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


# -- ${VAR} in a job YAML -------------------------------------------------------------------
def test_a_variable_outside_the_allow_list_is_an_error_naming_it_never_its_value(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE)
    monkeypatch.setenv("HOME_GROWN", FAKE + "-2")
    text = GOOD + "mlflow: {experiment: '${AWS_SECRET_ACCESS_KEY}'}\nstorage: {region: '${HOME_GROWN:-x}'}\n"
    with pytest.raises(JobSpecError) as err:
        load_job(_write(tmp_path, text))
    problems = err.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("line 3: ${AWS_SECRET_ACCESS_KEY}: a job spec reads only FLOWPP_*"), problems
    assert problems[1].startswith("line 4: ${HOME_GROWN}: "), problems  # a default does not make it allowed
    assert FAKE not in str(err.value)


def test_every_reference_problem_is_reported_at_once_with_its_line(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWPP_UNSET_A", raising=False)
    monkeypatch.setenv("FLOWPP_TWO_LINES", "a\nb: injected")
    text = GOOD + "train:\n  trace_dir: ${FLOWPP_UNSET_A}\nmodel: {preset: '${FLOWPP_TWO_LINES}'}\nx: ${NOT_MINE}\n"
    with pytest.raises(JobSpecError) as err:
        load_job(_write(tmp_path, text))
    assert err.value.problems == [
        "line 4: ${FLOWPP_UNSET_A}: FLOWPP_UNSET_A is not set and has no default (write ${FLOWPP_UNSET_A:-default})",
        "line 5: ${FLOWPP_TWO_LINES}: the value of FLOWPP_TWO_LINES spans lines",
        "line 6: ${NOT_MINE}: a job spec reads only FLOWPP_*, MLFLOW_TRACKING_URI and the names in env_allow",
    ]


def test_env_allow_is_read_before_expansion_and_admits_its_names(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVICE_TOKEN", FAKE)
    monkeypatch.setenv("FLOWPP_BUCKET", "s3://bkt")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    text = (
        "# ${ANYTHING} in a comment is not read\n"
        "name: t\n"
        "data: {train: '${FLOWPP_BUCKET}/t/manifest.json', valid: '${FLOWPP_BUCKET}/v/manifest.json'}\n"
        "mlflow: {tracking_uri: '${MLFLOW_TRACKING_URI}'}\n"
        "ray: {runtime_env: {env_vars: {SERVICE_TOKEN: '${SERVICE_TOKEN}'}}}\n"
        "env_allow: [SERVICE_TOKEN]  # after its use: read from the whole document first\n"
    )
    spec = load_job(_write(tmp_path, text))
    assert spec.data.train == "s3://bkt/t/manifest.json" and spec.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert spec.ray.runtime_env["env_vars"]["SERVICE_TOKEN"] == FAKE and spec.env_allow == ["SERVICE_TOKEN"]
    with pytest.raises(JobSpecError, match=r"env_allow\[0\]: '\$\{FLOWPP_X:-A\}' is not a variable name"):
        load_job(_write(tmp_path, GOOD + "env_allow: ['${FLOWPP_X:-A}']\n"))
    with pytest.raises(JobSpecError, match="env_allow: expected a list of variable names, got str"):
        load_job(_write(tmp_path, GOOD + "env_allow: SERVICE_TOKEN\n"))


def test_a_value_is_text_in_its_own_scalar_never_yaml_of_its_own(tmp_path, monkeypatch):
    """References expand after parsing: a comment sign, a flow mapping or a key in a value stays
    text; a plain scalar is typed from its final text, a quoted one stays a string."""
    monkeypatch.setenv("FLOWPP_A", "s3://b/x #y")
    monkeypatch.setenv("FLOWPP_C", "{a: 1}")
    monkeypatch.setenv("FLOWPP_K", "x\nstorage: {path: s3://elsewhere}".replace("\n", " "))
    monkeypatch.setenv("FLOWPP_STEPS", "40")
    text = (
        GOOD + "storage: {path: ${FLOWPP_A}, region: ${FLOWPP_K}}\n"
        "mlflow:\n  experiment: ${FLOWPP_C}\n"
        "train: {max_steps: ${FLOWPP_STEPS}, warmup_steps: '${FLOWPP_STEPS}'}\n"
    )
    spec = load_job(_write(tmp_path, text))
    assert spec.storage.path == "s3://b/x #y"  # not cut at " #" as a comment
    assert spec.mlflow.experiment == "{a: 1}"  # not a mapping
    assert spec.storage.region == "x storage: {path: s3://elsewhere}"  # one string, not a key
    assert spec.train.max_steps == 40 and spec.train.warmup_steps == 40
    tree, problems = jobenv.expand_tree("a: ${FLOWPP_STEPS}\nb: '${FLOWPP_STEPS}'\nc: ${FLOWPP_C}\n", yaml.SafeLoader)
    assert problems == [] and tree == {"a": 40, "b": "40", "c": "{a: 1}"}


def test_a_set_but_empty_variable_takes_the_default_as_in_the_shell(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWPP_B", "")
    monkeypatch.delenv("FLOWPP_UNSET_B", raising=False)
    text = GOOD + "storage: {path: '${FLOWPP_B:-s3://default/runs}'}\nmlflow: {experiment: '${FLOWPP_UNSET_B:-e}'}\n"
    spec = load_job(_write(tmp_path, text))
    assert spec.storage.path == "s3://default/runs" and spec.mlflow.experiment == "e"
    tree, problems = jobenv.expand_tree("a: x${FLOWPP_B}y\nb: ${FLOWPP_B}\n", yaml.SafeLoader)
    assert problems == [] and tree == {"a": "xy", "b": None}  # set and empty, no default: empty (b: is null)


# -- one redaction ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://alice:pw@h:5000/x", "http://***@h:5000/x"),
        ("see 'postgresql://u:p@ss@db/x' and s3://bkt/k", "see 'postgresql://***@db/x' and s3://bkt/k"),
        ("https://token@github.com/o/r.git?a=b@c", "https://***@github.com/o/r.git?a=b@c"),
        ("mailto-ish user@host and http://h/p@q", "mailto-ish user@host and http://h/p@q"),
        ("https://db/x?password=hunter2&user=al", "https://db/x?password=***&user=al"),
        ("GET /cb?code=1&access_token=abc.def#top", "GET /cb?code=1&access_token=***#top"),
        ("s3://b/k?X-Amz-Signature=0badc0de&X-Amz-Date=1", "s3://b/k?X-Amz-Signature=***&X-Amz-Date=1"),
        ("https://h/x?token_path=/etc/t&page=2", "https://h/x?token_path=/etc/t&page=2"),
    ],
)
def test_url_user_info_is_masked_in_any_text(text, expected):
    assert redact(text) == expected


def test_credential_names_are_recognised_and_their_environment_values_masked(monkeypatch):
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "apiKey", "db.password", "SERVICE_TOKEN", "key",
                 "PGPASSWORD", "GITHUBTOKEN"):  # fmt: skip
        assert is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "PWD", "monkey", "keep_checkpoints"):
        assert not is_secret_name(name), name
    monkeypatch.setenv("RAY_AUTH_TOKEN", FAKE)
    monkeypatch.setenv("MY_DB_PASSWORD", FAKE + "-db")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert redact(f"a {FAKE}-db b {FAKE} false") == "a *** b *** false"


def test_a_glued_credential_name_read_through_env_allow_is_masked(tmp_path, monkeypatch, capsys):
    """``PGPASSWORD`` reads as one word; its value is masked all the same, wherever it appears."""
    monkeypatch.setenv("PGPASSWORD", FAKE + "-pg")
    text = (
        GOOD + "env_allow: [PGPASSWORD]\nmlflow: {tracking_uri: 'postgresql://db/x?sslmode=require&p=${PGPASSWORD}'}\n"
    )
    spec = load_job(_write(tmp_path, text))
    assert spec.mlflow.tracking_uri.endswith(f"p={FAKE}-pg")
    assert redact(f"connecting with {FAKE}-pg") == "connecting with ***"
    assert not any(FAKE in str(v) for v in public_params(spec).values())
    assert main(["validate", str(tmp_path / "job.yaml")]) == 0
    assert FAKE not in capsys.readouterr().out


def test_trees_mask_credential_keys_and_every_env_var_value(monkeypatch):
    tree = {
        "ray": {"runtime_env": {"env_vars": {"A": "plain", "B": ""}, "pip": ["--index-url https://u:p@pypi.x/s"]}},
        "s3": {"secret_key": FAKE, "password": None},
        "mlflow": {"tracking_uri": "http://me:pw@h"},
    }
    out = redact_tree(tree)
    assert out["ray"]["runtime_env"] == {"env_vars": {"A": "***", "B": ""}, "pip": ["--index-url https://***@pypi.x/s"]}
    assert out["s3"] == {"secret_key": "***", "password": None} and out["mlflow"]["tracking_uri"] == "http://***@h"
    assert tree["s3"]["secret_key"] == FAKE  # a copy


def test_mlflow_params_and_the_job_yaml_artifact_carry_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWPP_MLFLOW", f"http://flowpp:{FAKE}@127.0.0.1:5000")
    monkeypatch.setenv("MY_TOKEN", FAKE + "-env")
    text = (
        GOOD + "mlflow: {tracking_uri: '${FLOWPP_MLFLOW}'}\nenv_allow: [MY_TOKEN]\n"
        "ray: {runtime_env: {env_vars: {MY_TOKEN: '${MY_TOKEN}', FLOWPP_MLFLOW: '${FLOWPP_MLFLOW}'}}}\n"
    )
    spec = load_job(_write(tmp_path, text))
    assert FAKE in spec.mlflow.tracking_uri  # the spec itself keeps it: MLflow needs it
    params = public_params(spec)
    assert params["mlflow.tracking_uri"] == "http://***@127.0.0.1:5000"
    assert params["ray.runtime_env.env_vars.MY_TOKEN"] == "***"
    tags = spec_tags(spec)  # what a training run logs: the whole spec as tags, a few params
    assert tags["spec.mlflow.tracking_uri"] == "http://***@127.0.0.1:5000"
    assert tags["spec.ray.runtime_env.env_vars.MY_TOKEN"] == "***"
    artifact = yaml.safe_dump(redact_tree(spec.model_dump()))
    logged = repr(params) + repr(tags) + repr(headline_params(spec))
    assert FAKE not in logged and FAKE not in artifact and "MY_TOKEN" in artifact


def test_job_spec_errors_and_every_flowpp_error_are_masked(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE)
    with pytest.raises(JobSpecError) as err:
        validate({"name": "t", "data": {"train": f"s3://u:{FAKE}@b/t/", "valid": "s3://b/v/manifest.json"}})
    assert "data.train: 's3://***@b/t/' should point at a manifest" in str(err.value)
    assert FAKE not in str(err.value) and FAKE not in repr(err.value.problems)
    assert str(FlowppError(f"cannot reach {FAKE}")) == "cannot reach ***"
    assert str(UserError("http://a:b@h")) == "http://***@h"


# -- logs --------------------------------------------------------------------------------------
def test_every_log_record_is_masked_message_arguments_and_traceback(root, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", FAKE)
    root.handlers = []  # pytest adds its capture handler after fixtures: a fresh process has none
    setup_logging("INFO")
    log = logging.getLogger("orchestrator.anywhere")
    log.info("tracking at %s with %s", f"http://bob:{FAKE}@h", FAKE)
    try:
        raise ValueError(f"server said: bad token {FAKE}")
    except ValueError:
        log.exception("failed")
    err = capsys.readouterr().err
    assert "tracking at http://***@h with ***" in err and "ValueError: server said: bad token ***" in err
    assert FAKE not in err


def test_a_logged_name_with_a_newline_stays_on_its_line(root, capsys):
    """Any name logged as an argument (a shard's URL, a sample's key from a tar) is quoted when it
    does not print, so a newline in it cannot forge a log line; the message's own newlines stay."""
    root.handlers = []
    setup_logging("INFO")
    logging.getLogger("orchestrator.anywhere").warning("corrupt sample %s in %s", "k\nINFO forged", "s3://b/x.tar")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "corrupt sample 'k\\nINFO forged' in s3://b/x.tar" in err[0], err


def test_handlers_already_in_place_get_the_filter_once(root, monkeypatch):
    existing = logging.StreamHandler()  # Ray Train's console handler in a worker
    root.handlers = [existing]
    own = logging.StreamHandler()
    mlflow_logger = logging.getLogger("mlflow")
    monkeypatch.setattr(mlflow_logger, "handlers", [own])
    setup_logging("INFO")
    setup_logging("DEBUG")
    for handler in (existing, own):
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1


# -- what leaves the driver --------------------------------------------------------------------
def test_workers_train_loop_config_has_no_runtime_env_variables(tmp_path):
    from orchestrator.driver.launch import make_trainer

    spec = validate(
        {
            "name": "t",
            "data": {"train": "file:///d/t/manifest.json", "valid": "file:///d/v/manifest.json"},
            "storage": {"path": str(tmp_path / "runs")},
            "ray": {"runtime_env": {"env_vars": {"MY_TOKEN": FAKE}, "pip": ["numpy"]}},
        }
    )
    config = make_trainer(spec, None).train_loop_config
    assert config["job"]["ray"]["runtime_env"] == {"pip": ["numpy"]}
    assert FAKE not in repr(config) and spec.ray.runtime_env["env_vars"]["MY_TOKEN"] == FAKE


def test_submit_refuses_a_credential_in_the_entrypoint_before_contacting_ray(monkeypatch):
    from orchestrator.driver.submit import submit

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE)
    spec = validate({"name": "t", "data": {"train": "s3://b/t/manifest.json", "valid": "s3://b/v/manifest.json"}})
    spec = spec.model_copy(update={"ray": spec.ray.model_copy(update={"address": "http://127.0.0.1:9"})})
    for bad in (f"mlflow.tracking_uri=http://u:{FAKE}@h", f"storage.region={FAKE}"):
        with pytest.raises(UserError, match=r"--set (mlflow.tracking_uri|storage.region): the value holds"):
            submit(spec, "jobs/demo.yaml", ["train.lr=1e-3", bad])


def test_submit_refuses_to_upload_credential_files_unless_excluded(tmp_path, monkeypatch):
    from orchestrator.driver.submit import check_submittable

    spec = validate({"name": "t", "data": {"train": "s3://b/t/manifest.json", "valid": "s3://b/v/manifest.json"},
                     "ray": {"address": "http://127.0.0.1:9"}})  # fmt: skip
    home = tmp_path / "home"  # a home-like folder: not a git repository, every file would go
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = x\n")
    (home / ".env").write_text("TOKEN=x\n")
    (home / "notes.txt").write_text("fine\n")
    with pytest.raises(UserError) as refused:
        check_submittable(spec, [], root=home)
    text = str(refused.value)
    assert "holds credential files: .aws/credentials, .env;" in text and "notes.txt" not in text
    excluding = spec.model_copy(
        update={"ray": spec.ray.model_copy(update={"runtime_env": {"excludes": [".env", ".aws"]}})}
    )
    check_submittable(excluding, [], root=home)  # left out of the upload: fine
    repo = tmp_path / "repo"  # in a git repository, what .gitignore names is not uploaded
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text(".env\n")
    (repo / ".env").write_text("TOKEN=x\n")
    (repo / "server.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(UserError, match="holds credential files: server.pem;"):
        check_submittable(spec, [], root=repo)


def test_cli_reports_a_forbidden_variable_by_name_with_exit_code_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", FAKE)
    path = _write(tmp_path, GOOD + "mlflow: {experiment: '${MLFLOW_TRACKING_PASSWORD}'}\n")
    assert main(["--debug", "train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "line 3: ${MLFLOW_TRACKING_PASSWORD}: a job spec reads only" in err and FAKE not in err
