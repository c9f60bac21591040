"""The ``kerasllm`` command line: help, and a clean error (exit 2) for each user mistake.

User mistakes run the CLI as a subprocess, as a user would, so that the exit code
and the absence of a traceback are real. Each one fails in config validation or
plugin lookup, before any training. ``--help`` of the subcommands runs in-process:
it is the same argparse code, without a TensorFlow import per case.
"""

import concurrent.futures
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import SPECIAL_TOKENS, tiny_config

from kerasllm.cli import main

# TensorFlow's native logger writes these to stderr at import, whatever
# TF_CPP_MIN_LOG_LEVEL says; they are not kerasllm's output.
TF_LOG_LINE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\)|[IWEF]\d{4} \d\d:\d\d:\d\d")

ERROR_PREFIX = "kerasllm: error: "


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "kerasllm.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )


def own_stderr(result):
    return [line for line in result.stderr.splitlines() if not TF_LOG_LINE.match(line)]


def no_traceback(result):
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def user_error(result):
    """The message after ``kerasllm: error:``, checking the exit code and the format."""
    no_traceback(result)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = own_stderr(result)
    assert lines and lines[0].startswith(ERROR_PREFIX), result.stderr
    assert len(lines) == 1, lines  # one message, nothing after it
    assert result.stdout == ""
    return lines[0][len(ERROR_PREFIX):]


def write_config(path, config):
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """``pretrain`` runs with one user mistake each, by name; all started at once,
    since each spends seconds importing TensorFlow."""
    root = tmp_path_factory.mktemp("mistakes")
    # A given vocabulary and a one-file corpus: the objective lookup fails
    # without training a tokenizer first.
    (root / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, "the", "cat"]) + "\n")
    (root / "corpus.txt").write_text("the cat\nthe cat\n")
    typo = write_config(root / "typo.yaml", tiny_config(
        objectives=[{"name": "mlmm"}],
        tokenizer={"vocabulary": str(root / "vocab.txt")},
        data={"source": "text", "options": {"paths": str(root / "corpus.txt")}},
    ))
    commands = {
        "missing file": ["missing.yaml"],
        "unknown objective": [typo, "--output", root / "typo-run"],
        "unknown key": [write_config(root / "key.yaml", tiny_config(training={"stepz": 10}))],
        "bad value": [write_config(root / "value.yaml", tiny_config(model={"kind": "rnn"}))],
        "zero steps": ["quickstart", "--steps", "0"],
    }
    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        runs = {name: pool.submit(run_cli, "pretrain", *args, cwd=root)
                for name, args in commands.items()}
    return root, {name: run.result() for name, run in runs.items()}


# --- Help -------------------------------------------------------------------------------


def test_console_script_help():
    script = shutil.which("kerasllm")
    assert script, "the `kerasllm` console script is not on PATH"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kerasllm ")
    for command in ("pretrain", "plugins"):
        assert re.search(rf"^\s+{command}\s+\S", result.stdout, re.MULTILINE), result.stdout


@pytest.mark.parametrize("argv, expected", [
    (["pretrain", "--help"],
     ["usage: kerasllm pretrain", "--steps STEPS", "--output OUTPUT", "CONFIG", "quickstart",
      "overrides training.steps", "overrides training.output"]),
    (["plugins", "--help"], ["usage: kerasllm plugins", "list"]),
    (["plugins", "list", "--help"], ["usage: kerasllm plugins list", "'kerasllm' entry-point"]),
])
def test_subcommand_help(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, (text, out)


@pytest.mark.parametrize("argv, usage", [
    ([], "usage: kerasllm "),
    (["plugins"], "usage: kerasllm plugins "),
])
def test_missing_command_prints_help_and_fails(capsys, argv, usage):
    assert main(argv) == 2
    assert capsys.readouterr().out.startswith(usage)


# --- User mistakes ------------------------------------------------------------------------


def test_missing_config_file(mistakes):
    _, runs = mistakes
    assert user_error(runs["missing file"]) == (
        "config file not found: missing.yaml; give a YAML file or a built-in config (quickstart)")


def test_unknown_objective_lists_known_ones(mistakes):
    root, runs = mistakes
    message = user_error(runs["unknown objective"])
    assert re.fullmatch(r"unknown objective 'mlmm' in objectives\[0\]\.name; "
                        r"known: .*\bclm, .*\bmlm\b.*", message), message
    assert not (root / "typo-run" / "model.keras").exists()


def test_invalid_config_key(mistakes):
    _, runs = mistakes
    message = user_error(runs["unknown key"])
    assert message.startswith("unknown config key 'training.stepz'; allowed: ")
    assert "steps, steps_per_epoch" in message


def test_invalid_config_value(mistakes):
    _, runs = mistakes
    assert user_error(runs["bad value"]) == (
        "model.kind must be one of encoder, decoder, encoder_decoder; got 'rnn'")


def test_steps_must_be_positive(mistakes):
    root, runs = mistakes
    result = runs["zero steps"]
    no_traceback(result)
    assert result.returncode == 2
    lines = own_stderr(result)
    assert lines[0].startswith("usage: kerasllm pretrain ")
    assert lines[-1] == ("kerasllm pretrain: error: argument --steps: "
                         "must be a positive integer, got 0")
    assert result.stdout == ""
    assert not (root / "runs").exists()  # nothing started
