"""Shared recipe helpers in egs/tools: yaml2args.py, parse_options.sh and log.sh."""
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "egs" / "tools"
RECIPE_CONFIGS = sorted((TOOLS.parent / "iwslt14" / "nmt" / "conf").glob("*.yaml"))


def yaml2args(tmp_path: Path, text: str, *options: str) -> subprocess.CompletedProcess:
    config = tmp_path / "x.yaml"
    config.write_text(text, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(TOOLS / "yaml2args.py"), str(config), *options],
        capture_output=True, text=True,
    )


# --------------------------------------------------------------------------------------------------
# yaml2args.py
# --------------------------------------------------------------------------------------------------
def test_yaml2args_flat_config(tmp_path):
    result = yaml2args(
        tmp_path,
        "arch: lite_transformer_iwslt_de_en\n"
        "max_tokens: 4096\n"
        "adam-betas: (0.9, 0.98)\n"
        "warmup_init_lr: 1.0e-7\n"
        "conv_linear: true\n"
        "fp16: false\n"
        "seed:\n"
        "encoder_branch_type: [attn:1:80:4, lightweight:default:80:4]\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n") == [
        "--arch", "lite_transformer_iwslt_de_en",
        "--max-tokens", "4096",
        "--adam-betas", "(0.9, 0.98)",
        "--warmup-init-lr", "1e-07",
        "--conv-linear",
        "--encoder-branch-type", "attn:1:80:4", "lightweight:default:80:4",
        "",
    ]


def test_yaml2args_sections_and_null_separator(tmp_path):
    text = "train:\n  lr: 0.0005\n  max_update: 10\ngenerate:\n  beam: 4\n  remove_bpe: sentencepiece\n"
    train = yaml2args(tmp_path, text, "--section", "train")
    assert train.stdout == "--lr\n0.0005\n--max-update\n10\n"
    generate = yaml2args(tmp_path, text, "--section", "generate", "--null")
    assert generate.stdout.split("\0") == ["--beam", "4", "--remove-bpe", "sentencepiece", ""]


def test_yaml2args_array_round_trip_through_bash(tmp_path):
    """The documented way to read the output into a bash array keeps a value with spaces whole."""
    config = tmp_path / "x.yaml"
    config.write_text("adam_betas: (0.9, 0.98)\nlr: 0.001\n", encoding="utf-8")
    script = (
        f'"{sys.executable}" "{TOOLS / "yaml2args.py"}" "{config}" > "{tmp_path}/args"\n'
        f'mapfile -t args < "{tmp_path}/args"\n'
        'printf "<%s>" "${args[@]}"\n'
    )
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True)
    assert result.stdout == "<--adam-betas><(0.9, 0.98)><--lr><0.001>"


@pytest.mark.parametrize(
    "text, options, expected",
    [
        ("train:\n  lr: 1\n", [], "has sections (train); choose one with --section"),
        ("train:\n  lr: 1\n", ["--section", "decode"], "has no section 'decode'; its sections: train"),
        ("lr: 1\n", ["--section", "train"], "has no sections, so --section train cannot be used"),
        ("train:\n  lr: 1\nbeam: 4\n", ["--section", "train"], "mixes sections (train) with top-level"),
        ("lr: [1, [2]]\n", [], "key 'lr': list items must be strings or numbers"),
        ("train:\n  optim:\n    lr: 1\n", ["--section", "train"], "key 'train.optim' holds a mapping"),
        ("max tokens: 1\n", [], "key 'max tokens' is not an option name"),
        ("lr: []\n", [], "key 'lr' is an empty list"),
        ("- lr\n- 1\n", [], "expected a mapping of option: value at the top, got a list"),
        ("lr: 1\n  beam: 4\n", [], "x.yaml:2:7: not valid YAML"),
        ("lr: |\n  two\n  lines\n", [], "contains a line break; use --null"),
    ],
)
def test_yaml2args_errors_name_file_and_key(tmp_path, text, options, expected):
    result = yaml2args(tmp_path, text, *options)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"yaml2args.py: error: {tmp_path / 'x.yaml'}")
    assert expected in result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback


def test_yaml2args_missing_file(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TOOLS / "yaml2args.py"), str(tmp_path / "nope.yaml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr == f"yaml2args.py: error: config file {tmp_path / 'nope.yaml'} does not exist\n"


@pytest.mark.parametrize("config", RECIPE_CONFIGS, ids=lambda path: path.name)
def test_recipe_configs_convert(config):
    """Every shipped config converts, with the paper's branch layout (half the channels per branch)."""
    for section in ("train", "generate"):
        result = subprocess.run(
            [sys.executable, str(TOOLS / "yaml2args.py"), str(config), "--section", section],
            capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr
    args = subprocess.run(
        [sys.executable, str(TOOLS / "yaml2args.py"), str(config), "--section", "train"],
        capture_output=True, text=True,
    ).stdout.split("\n")
    dim = int(args[args.index("--encoder-embed-dim") + 1])
    branches = args[args.index("--encoder-branch-type") + 1 : args.index("--encoder-branch-type") + 3]
    assert branches == [f"attn:1:{dim // 2}:4", f"lightweight:default:{dim // 2}:4"]
    assert config.name == f"lite_transformer_iwslt_de_en_{dim}.yaml"


# --------------------------------------------------------------------------------------------------
# parse_options.sh and log.sh
# --------------------------------------------------------------------------------------------------
SCRIPT = """#!/usr/bin/env bash
# Demo recipe: shows how options work.
#
# Second paragraph of the help.
set -euo pipefail

stage=0          # first stage to run
stop_stage=100   # last stage to run
use_gpu=false    # train on the GPU
name=""          # experiment name
. "{tools}/log.sh"
. "{tools}/parse_options.sh"

echo "stage=${{stage}} stop_stage=${{stop_stage}} use_gpu=${{use_gpu}} name=${{name}} rest=$*"
log "done"
"""


@pytest.fixture
def demo_script(tmp_path):
    path = tmp_path / "demo.sh"
    path.write_text(SCRIPT.format(tools=TOOLS), encoding="utf-8")
    return path


def run_script(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True)


def test_parse_options_sets_variables(demo_script):
    result = run_script(
        demo_script, "--stage", "2", "--stop-stage=3", "--use_gpu", "true", "--name", "a b", "x", "y"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "stage=2 stop_stage=3 use_gpu=true name=a b rest=x y\n"


def test_parse_options_double_dash_ends_options(demo_script):
    result = run_script(demo_script, "--stage", "1", "--", "--not-an-option")
    assert result.stdout == "stage=1 stop_stage=100 use_gpu=false name= rest=--not-an-option\n"


def test_parse_options_help(demo_script):
    result = run_script(demo_script, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Demo recipe: shows how options work.\n\nSecond paragraph of the help.\n")
    assert "  --stage 0" in result.stdout and "first stage to run" in result.stdout
    assert "  --stop-stage 100" in result.stdout and "last stage to run" in result.stdout
    assert "  --use-gpu false" in result.stdout
    assert "stage=" not in result.stdout  # exits before the script body


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stges", "1"], "unknown option --stges"),
        (["--stage"], "option --stage needs a value"),
        (["--use-gpu", "yes"], "option --use-gpu takes true or false, got 'yes'"),
        (["--bad/name", "1"], "unknown option --bad/name"),
    ],
)
def test_parse_options_errors(demo_script, args, message):
    result = run_script(demo_script, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"demo.sh: error: {message}; valid options: ")
    assert "valid options: --stage --stop-stage --use-gpu --name (see demo.sh --help)\n" in result.stderr


def test_log_prints_time_file_and_line(demo_script):
    result = run_script(demo_script)
    assert result.returncode == 0
    line = result.stderr.strip()
    timestamp, where, message = line.split(" ", 2)
    assert len(timestamp) == len("2024-01-01T00:00:00") and timestamp[10] == "T"
    log_line = SCRIPT.splitlines().index('log "done"') + 1
    assert where == f"(demo.sh:{log_line})"
    assert message == "done"
