"""flowpp prepare checks its numeric flags and its output URL before any work, naming the flag; the
global flags (--log-level, --debug, --progress) work before and after the command."""

import pytest

from orchestrator.cli import build_parser

pytestmark = pytest.mark.unit

BASE = ["prepare", "demo", "--output", "file:///tmp/out"]


@pytest.mark.parametrize(
    "argv, flag, says",
    [
        (["--upload-workers", "0"], "--upload-workers", "'0': must be a positive integer"),
        (["--upload-workers", "two"], "--upload-workers", "'two' is not a positive integer"),
        (["--shard-mb", "-1"], "--shard-mb", "'-1': must be a positive number"),
        (["--shard-mb", "nan"], "--shard-mb", "'nan': must be a positive number"),
        (["--image-size", "0"], "--image-size", "'0': must be a positive integer"),
        (["--count", "-5"], "--count", "'-5': must be an integer >= 0"),
    ],
)
def test_a_bad_number_names_its_flag(argv, flag, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(BASE + argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: {says}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, flag, says",
    [
        (BASE + ["--seed", "-1"], "--seed", "'-1': must be a seed from 0 to 2147483647"),
        (["evaluate", "--baseline", "png", "--data", "m.json", "--max-images", "-1"], "--max-images",
         "'-1': must be an integer >= 0"),
        (["evaluate", "--baseline", "png", "--data", "m.json", "--batch-size", "0"], "--batch-size",
         "'0': must be a positive integer"),
        (["smoke", "--steps", "0"], "--steps", "'0': must be a positive integer"),
        (["smoke", "--seed", "99999999999"], "--seed", "'99999999999': must be a seed from 0 to 2147483647"),
    ],
)  # fmt: skip
def test_counts_and_seeds_of_every_command_are_checked_naming_the_flag(argv, flag, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: {says}" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["s3://", "s3:///", "file://", "  "])
def test_an_output_without_a_bucket_or_folder_is_refused(url, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["prepare", "demo", "--output", url])
    assert exit_info.value.code == 2
    assert f"argument --output: {url!r} names no bucket or folder" in capsys.readouterr().err


def test_good_flags_parse_to_numbers():
    args = build_parser().parse_args(BASE + ["--upload-workers", "2", "--shard-mb", "0.5", "--image-size", "32"])
    assert (args.upload_workers, args.shard_mb, args.image_size, args.output) == (2, 0.5, 32, "file:///tmp/out")
    assert build_parser().parse_args(["prepare", "demo", "--output", "s3://bucket"]).output == "s3://bucket"


@pytest.mark.parametrize(
    ("argv", "progress", "level", "debug"),
    [(["presets"], None, "INFO", False),
     (["--progress", "on", "--log-level", "warning", "--debug", "presets"], "on", "WARNING", True),
     (["evaluate", "--baseline", "png", "--data", "m.json", "--progress", "off", "--log-level", "debug", "--debug"],
      "off", "DEBUG", True),
     (["--progress", "on", "--log-level", "error", "presets", "--progress", "off"], "off", "ERROR", False)],
)  # fmt: skip
def test_global_flags_work_before_and_after_the_command(argv, progress, level, debug):
    """Typed after the command too, as most CLIs take them; given in both places, the later one wins,
    and one given only before the command is not reset by the command's own parser."""
    args = build_parser().parse_args(argv)
    assert (args.progress, args.log_level, args.debug) == (progress, level, debug)


def test_every_command_takes_the_global_flags_after_it():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, sub in commands.items():
        flags = {opt for action in sub._actions for opt in action.option_strings}
        assert {"--log-level", "--debug", "--progress"} <= flags, name
