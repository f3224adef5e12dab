"""The recipes' quiet console (egs/tools/run_logged.sh, egs/tools/console_filter.py, egs/tools/demo_summary.sh),
driven with fake commands that print what fairseq prints: every line goes to the log, the console shows
progress bars and real errors only, the command's exit status is the wrapper's."""
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import List, Optional

import pytest

from conftest import REPO_ROOT, cli_env, cli_output, run_cli

TOOLS = REPO_ROOT / "egs" / "tools"
sys.path.insert(0, str(TOOLS))
import console_filter  # noqa: E402  (egs/tools is not a package)

#: What fairseq-train prints around its progress: hydra and torch warnings, a model printout, INFO lines.
NOISE = [
    "/venv/hydra/_internal/defaults_list.py:251: UserWarning: In 'config': Defaults list is missing `_self_`.",
    "  warnings.warn(msg, UserWarning)",
    "/venv/fairseq/dataclass/utils.py:9: deprecation_warning: --foo is deprecated",
    "2024-01-01 00:00:00 | INFO | fairseq_cli.train | TransformerModel(",
    "  (encoder): TransformerEncoderBase(",
    "    (dropout_module): FairseqDropout()",
    "/venv/fairseq/checkpoint_utils.py:315: FutureWarning: You are using `torch.load` with `weights_only=False`",
    "2024-01-01 00:00:00 | WARNING | fairseq.tasks.fairseq_task | 3 samples have invalid sizes and will be skipped",
    "2024-01-01 00:00:00 | INFO | fairseq.utils | Please install tensorboardX: pip install tensorboardX",
]
TRAIN_LINES = NOISE + [
    f"2024-01-01 00:00:01 | INFO | train_inner | epoch 001:     {n} / 100 loss=9.{n:03d}, nll_loss=9.1, "
    f"num_updates={n}, lr=0.001" for n in range(10, 101, 10)
] + [
    "2024-01-01 00:00:02 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 8.5 | nll_loss 8 | num_updates 100",
    "2024-01-01 00:00:02 | INFO | fairseq_cli.train | done training in 3.0 seconds",
]
FAILURE_LINES = ["Traceback (most recent call last):", '  File "train.py", line 1, in <module>', "ValueError: boom"]

#: A fake command: prints the lines of the file argv[1] (stdout for lines starting with "out:"), then exits
#: with argv[2]; each line flushed, so that the order in the log is the order here.
FAKE = """import sys
for line in open(sys.argv[1], encoding="utf-8").read().splitlines():
    if line.startswith("out:"):
        print(line[4:], flush=True)
    else:
        print(line, file=sys.stderr, flush=True)
sys.exit(int(sys.argv[2]))
"""

#: A recipe script with the recipes' option handling (recipe.sh) that runs the fake command through run_logged.
RECIPE = """#!/usr/bin/env bash
# Fake recipe of the console tests.
set -euo pipefail

lines=""        # file of lines the fake command prints
status=0        # exit status of the fake command
progress=""     # run_logged's progress options
verbose=false   # show the full output of every command on the console
. "{tools}/recipe.sh"

# shellcheck disable=SC2086
run_logged "{log}" ${{progress}} -- python3 "{fake}" "${{lines}}" "${{status}}"
echo "after the command"
"""


def write_lines(path: Path, lines: List[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    (tmp_path / "fake.py").write_text(FAKE, encoding="utf-8")
    script = tmp_path / "run.sh"
    script.write_text(RECIPE.format(tools=TOOLS, log=tmp_path / "exp" / "x" / "train.log", fake=tmp_path / "fake.py"))
    return script


def run_recipe(script: Path, lines: List[str], *args: str) -> subprocess.CompletedProcess:
    return run_cli(["bash", script, "--lines", write_lines(script.parent / "lines.txt", lines), *args], timeout=60)


def assert_quiet(console: str) -> None:
    for noise in ("Warning", "warnings.warn", "deprecation_warning", "INFO", "TransformerModel", "FairseqDropout",
                  "tensorboardX", "invalid sizes"):
        assert noise not in console, console


def test_training_console_shows_progress_and_no_noise(recipe):
    result = run_recipe(recipe, TRAIN_LINES, "--progress", "--desc fake --updates 100")
    assert result.returncode == 0, cli_output(result)
    assert result.stdout == "after the command\n"
    assert_quiet(result.stderr)
    bars = result.stderr.splitlines()  # stderr is no terminal: one line at 25, 50, 75 and 100 %
    assert [line.split("|")[0] for line in bars] == ["fake:  30%", "fake:  50%", "fake:  80%", "fake: 100%"], bars
    assert "100/100" in bars[-1] and "loss=9.100" in bars[-1], bars
    log = recipe.parent / "exp" / "x" / "train.log"
    assert log.read_text(encoding="utf-8") == "".join(line + "\n" for line in TRAIN_LINES)  # every line


def test_failure_propagates_the_status_and_prints_the_end_of_the_log(recipe):
    lines = TRAIN_LINES + FAILURE_LINES
    result = run_recipe(recipe, lines, "--progress", "--updates 100", "--status", "3")
    assert result.returncode == 3, cli_output(result)
    assert "after the command" not in result.stdout  # set -e stopped the recipe
    log = recipe.parent / "exp" / "x" / "train.log"
    assert log.read_text(encoding="utf-8") == "".join(line + "\n" for line in lines)
    console = result.stderr.splitlines()
    assert "Traceback (most recent call last):" in console and "ValueError: boom" in console  # the error, live
    tail_start = next(i for i, line in enumerate(console) if "error: python3 failed (exit status 3)" in line)
    assert [line.strip() for line in console[tail_start + 1:-1]] == [line.strip() for line in lines[-20:]]
    assert console[-1].endswith(f"full log: {log}")
    assert_quiet("\n".join(console[:tail_start]))


def test_verbose_shows_everything(recipe):
    result = run_recipe(recipe, TRAIN_LINES + ["out:to stdout"], "--verbose", "true")
    assert result.returncode == 0, cli_output(result)
    assert result.stdout == "".join(line + "\n" for line in TRAIN_LINES) + "to stdout\nafter the command\n"
    log = recipe.parent / "exp" / "x" / "train.log"
    assert log.read_text(encoding="utf-8") == result.stdout.replace("after the command\n", "")


def test_bad_verbose_value_is_one_error_line(recipe):
    result = run_recipe(recipe, TRAIN_LINES, "--verbose", "yes")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--verbose takes true or false, got 'yes'" in result.stderr
    assert not (recipe.parent / "exp").exists()


def test_decoding_bar_counts_hypotheses_and_log_keeps_the_bytes(tmp_path):
    """generate.txt is fairseq-generate's output byte for byte (even invalid UTF-8); the bar counts each
    sentence once, and hypotheses that mention errors are not errors."""
    output = b"".join([
        b"/venv/torch/serialization.py:1: FutureWarning: weights_only\n",
        b"S-1\tdas ist ein Fehler\nT-1\tthis is an Error\nH-1\t-0.5\tRuntimeError: this is\nD-1\t-0.5\tthis is\n",
        b"S-0\tbyte \xff\nT-0\tbyte\nH-0\t-0.1\tbyte\nD-0\t-0.1\tbyte\nH-0\t-0.9\tsecond of nbest 2\n",
        b"S-2\tdrei\nT-2\tthree\nH-2\t-0.2\tthree\n",
        b"2024-01-01 00:00:03 | INFO | fairseq_cli.generate | Translated 3 sentences (9 tokens) in 0.1s "
        b"(30.00 sentences/s, 90.00 tokens/s)\n",
    ])
    log, fake = tmp_path / "decode_test" / "generate.txt", tmp_path / "generate.out"
    fake.write_bytes(output)
    result = subprocess.run(["bash", "-c", f'. "{TOOLS}/log.sh"; . "{TOOLS}/run_logged.sh"; '
                             f'run_logged "{log}" --desc "decode x" --sentences 3 -- cat "{fake}"'],
                            capture_output=True, env=cli_env())
    assert result.returncode == 0, result.stderr
    assert log.read_bytes() == output
    console = result.stderr.decode()
    assert "Error" not in console and "Warning" not in console, console
    assert console.splitlines()[-1].startswith("decode x: 100%") and "3/3" in console and "speed=30.00 sent/s" in console


def test_status_propagates_without_errexit_and_stdout_file(tmp_path):
    """Outside set -e the status is still the command's (pipefail semantics) and errexit stays off; --stdout
    keeps the command's stdout alone in a file, the log has everything; --append adds to the log."""
    log, table = tmp_path / "bench" / "benchmark.log", tmp_path / "bench" / "BENCHMARK.md"
    script = f"""
. "{TOOLS}/log.sh"; . "{TOOLS}/run_logged.sh"
run_logged "{log}" --count 'batch [0-9]+' --unit run --stdout "{table}" -- python3 -c '
import sys
for b in (1, 32):
    print(f"bench: stock, batch {{b}}, threads 1", file=sys.stderr, flush=True)
print("| system | batch |", flush=True)
sys.exit(4)'
echo "status=$? errexit=${{-//[^e]/}}"
run_logged "{log}" --append -- python3 -c 'print("appended")'
echo "status=$?"
"""
    result = run_cli(["bash", "-c", script], timeout=60)
    assert result.stdout == "status=4 errexit=\nstatus=0\n", cli_output(result)
    assert table.read_text() == "| system | batch |\n"
    assert sorted(log.read_text().splitlines()) == sorted([
        "bench: stock, batch 1, threads 1", "bench: stock, batch 32, threads 1", "| system | batch |", "appended"])
    assert "2run [" in result.stderr and "failed (exit status 4)" in result.stderr, result.stderr


def test_fraction_bars_of_the_prepare_commands(tmp_path):
    lines = ["English sentences of the de-en gettext corpus: 3000", "wavs: 5/10 (0 already there), 1.0 s",
             "wavs: 10/10 (0 already there), 2.0 s", "train: 4/8 utterances (1.0 s)",
             "skipping x.mo: Python's gettext cannot read it (UnicodeDecodeError: bad)", "warning: 2 files unreadable"]
    result = subprocess.run([sys.executable, str(TOOLS / "console_filter.py"), "--log", str(tmp_path / "p.log"),
                             "--fraction", "--desc", "synthesis", "--unit", "wav"],
                            input="\n".join(lines) + "\n", capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == ""
    bars = result.stderr.splitlines()
    assert [bar.split("|")[0] for bar in bars] == ["synthesis: wavs:  50%", "synthesis: wavs: 100%", "synthesis: train:  50%"]
    assert (tmp_path / "p.log").read_text().splitlines() == lines


@pytest.mark.parametrize("line, error", [
    ("fairseq-train: error: unrecognized arguments: --nope", True),
    ("RuntimeError: CUDA out of memory", True),
    ("2024-01-01 00:00:00 | ERROR | fairseq.trainer | OOM", True),
    ("fairseq-accel-prepare: error: locale directory /x does not exist", True),
    ("/venv/x.py:3: UserWarning: an Error in a warning", False),
    ("2024-01-01 00:00:00 | INFO | fairseq_cli.train | criterion: ErrorRateCriterion", False),
    ("H-3\t-0.4\tValueError is what the message says", False),
    ("  (error_proj): Linear(in_features=8, out_features=8, bias=True)", False),
])
def test_error_lines(line, error):
    args = console_filter.parse_args(["--log", os.devnull])
    assert console_filter.ConsoleFilter(args, sys.stderr, live=False).is_error(line) is error


def test_live_bar_on_a_terminal(tmp_path):
    """With stderr on a terminal the bar is tqdm's, redrawn in place; warnings still stay off it."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen([sys.executable, str(TOOLS / "console_filter.py"), "--log", str(tmp_path / "t.log"),
                                "--desc", "train y", "--updates", "100"], stdin=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    process.communicate(("\n".join(TRAIN_LINES) + "\n").encode(), timeout=30)
    shown = b""
    while select.select([controller], [], [], 1)[0]:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal is closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    console = shown.decode()
    assert process.returncode == 0
    assert "\r" in console and "train y: 100%" in console and "100/100" in console, console
    assert_quiet(console)


def test_option_value_gives_the_max_update_of_the_run(tmp_path):
    """The training bar's total: the last --max-update of the arguments, as argparse takes it."""
    config = tmp_path / "c.yaml"
    config.write_text("train: {}\n")
    script = (f'log() {{ :; }}; configs="{config}"; average_checkpoints=0; train_jobs=1; . "{TOOLS}/fairseq_stages.sh"; '
              'option_value --max-update --lr 1 --max-update 500 --max-update=7 x; '
              'option_value --max-update --lr 1 --max-update 500 --max-update 20; option_value --max-update --lr 1')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert result.stdout == "7\n20\n\n", result.stderr


def test_averaging_more_epochs_than_kept_names_the_recipe_option(tmp_path):
    """--average_checkpoints 3 with two epoch checkpoints: one line naming the folder, the counts and the option,
    before fairseq-accel-average runs."""
    checkpoints = tmp_path / "exp" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("checkpoint1.pt", "checkpoint2.pt", "checkpoint_last.pt", "checkpoint_best.pt"):
        (checkpoints / name).write_bytes(b"")
    config = tmp_path / "c.yaml"
    config.write_text("train: {}\n")
    script = (f'log() {{ echo "$*"; }}; require() {{ :; }}; configs="{config}"; average_checkpoints=3; train_jobs=1; '
              f'. "{TOOLS}/fairseq_stages.sh"; average_last_checkpoints "{tmp_path / "exp"}"')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stdout.strip() == (
        f"error: {checkpoints} holds 2 epoch checkpoints, fewer than --average_checkpoints 3: lower "
        "--average_checkpoints, or train at least 3 epochs with a config that keeps them (keep_last_epochs, no "
        "no_epoch_checkpoints)")


#: The tables of the demo summary, by file below the tmp folder, in the order it prints them.
SUMMARY_TABLES = {"nmt/exp/RESULTS.md": "| nmt table |", "nmt/exp/transformer_mini/BENCHMARK.md": "| speed table |",
                  "nmt/exp/COMPRESSION.md": "| compression table |", "asr/exp/RESULTS.md": "| asr table |"}


def write_summary_tables(root: Path) -> None:
    for name, text in SUMMARY_TABLES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")


def test_demo_summary_prints_the_four_tables(tmp_path):
    nmt, asr = tmp_path / "nmt", tmp_path / "asr"
    write_summary_tables(tmp_path)
    summary = [str(TOOLS / "demo_summary.sh"), nmt, asr]
    result = run_cli(["bash", *summary])
    assert result.returncode == 0, cli_output(result)
    out = result.stdout
    assert [out.index(text) for text in SUMMARY_TABLES.values()] == sorted(out.index(t) for t in SUMMARY_TABLES.values())
    assert "Decoding speed, transformer_mini" in out
    (asr / "exp" / "RESULTS.md").unlink()
    missing = run_cli(["bash", *summary])
    assert missing.returncode == 1 and "not found" in missing.stdout


#: A fake fairseq-train: records its OMP_NUM_THREADS, waits (up to 30 s) until every experiment named in
#: FAKE_PEERS has started (so the test passes only if they run at the same time), prints training lines,
#: and fails for the experiment named in FAKE_FAIL.
FAKE_TRAIN = """#!/usr/bin/env python3
import os, sys, time
save_dir = sys.argv[sys.argv.index("--save-dir") + 1]
exp = os.path.dirname(save_dir)
name = os.path.basename(exp)
open(os.path.join(exp, "threads"), "w").write(os.environ.get("OMP_NUM_THREADS", "unset"))
open(os.path.join(exp, "started"), "w").close()
peers = [p for p in os.environ.get("FAKE_PEERS", "").split() if p]
deadline = time.time() + 30
while time.time() < deadline and not all(os.path.exists(os.path.join(os.path.dirname(exp), p, "started"))
                                         for p in peers):
    time.sleep(0.05)
print("waited for peers:", all(os.path.exists(os.path.join(os.path.dirname(exp), p, "started")) for p in peers))
for n in (5, 10):
    print(f"epoch 001: {n} / 10 loss=1.{n}, num_updates={n}", flush=True)
if name == os.environ.get("FAKE_FAIL"):
    print("Traceback (most recent call last):\\nValueError: fake failure of " + name, flush=True)
    sys.exit(4)
"""

#: The training stage of nmt.sh/asr.sh on fake configs: fairseq_stages.sh's train_experiments.
TRAIN_STAGE = """#!/usr/bin/env bash
set -euo pipefail
configs=""              # experiment configs
exp_dir=exp             # experiments
train_args=""           # extra fairseq-train arguments
decode_args=""          # extra fairseq-generate arguments
average_checkpoints=0   # epoch checkpoints averaged
train_jobs=1            # trainings at a time
verbose=false           # everything on the console
. "{tools}/recipe.sh"
. "{tools}/fairseq_stages.sh"
train_experiments data --extra-arg
echo "stage done"
"""


@pytest.fixture
def train_stage(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fairseq-train").write_text(FAKE_TRAIN, encoding="utf-8")
    (bin_dir / "fairseq-train").chmod(0o755)
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text("train:\n  max_update: 10\n", encoding="utf-8")
    script = tmp_path / "stage.sh"
    script.write_text(TRAIN_STAGE.format(tools=TOOLS), encoding="utf-8")
    return script


def run_train_stage(script: Path, *args: str, **env: Optional[str]) -> subprocess.CompletedProcess:
    path = f"{script.parent / 'bin'}{os.pathsep}{cli_env()['PATH']}"
    return run_cli(["bash", script, "--configs", "a.yaml b.yaml", *args], cwd=script.parent, timeout=120,
                   env={"PATH": path, **env})


def test_parallel_trainings_run_side_by_side_on_split_cores(train_stage):
    result = run_train_stage(train_stage, "--train_jobs", "2", FAKE_PEERS="a b", OMP_NUM_THREADS=None)
    assert result.returncode == 0, cli_output(result)
    exp = train_stage.parent / "exp"
    for name in ("a", "b"):
        log = (exp / name / "train.log").read_text(encoding="utf-8")
        assert "waited for peers: True" in log, log  # the other training had started: both ran at once
        assert (exp / name / "threads").read_text() == str(max(1, os.cpu_count() // 2))
        assert (exp / name / ".train.done").exists()
        assert f"train {name}: 100%" in result.stderr, result.stderr  # each its own bar
    assert result.stdout == "stage done\n"


def test_one_after_the_other_by_default_and_a_set_thread_count_is_kept(train_stage):
    result = run_train_stage(train_stage, FAKE_PEERS="", OMP_NUM_THREADS="3")
    assert result.returncode == 0, cli_output(result)
    for name in ("a", "b"):
        assert (train_stage.parent / "exp" / name / "threads").read_text() == "3"


def test_a_failed_parallel_training_fails_the_stage_after_the_other_ends(train_stage):
    result = run_train_stage(train_stage, "--train_jobs", "2", FAKE_PEERS="a b", FAKE_FAIL="a")
    assert result.returncode == 1, cli_output(result)
    assert "stage done" not in result.stdout
    exp = train_stage.parent / "exp"
    assert (exp / "b" / ".train.done").exists() and not (exp / "a" / ".train.done").exists()
    assert "ValueError: fake failure of a" in result.stderr
    assert f"full log: {exp / 'a' / 'train.log'}".replace(str(train_stage.parent) + "/", "") in result.stderr
    assert result.stderr.rstrip().endswith("error: a training failed (its log is named above)")


@pytest.mark.parametrize("jobs", ["0", "two"])
def test_bad_train_jobs_is_one_error_line(train_stage, jobs):
    result = run_train_stage(train_stage, "--train_jobs", jobs)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"--train_jobs must be the number of trainings" in result.stderr


#: A fake recipe for demo.sh: appends "<name> nice=<niceness> <arguments>" to ../calls.txt; the ASR data
#: stages wait until the NMT recipe has started (so they must run in the background), and fail with
#: FAKE_ASR_FAIL set.
FAKE_RECIPE = """#!/usr/bin/env bash
here=$(cd "$(dirname "$0")" && pwd)
echo "$(basename "${here}") nice=$(nice) $*" >> "${here}/../calls.txt"
if [ "$(basename "${here}")" = asr ] && [[ " $* " == *" --stop_stage 2 "* ]]; then
  for _ in $(seq 100); do grep -q '^nmt' "${here}/../calls.txt" && break; sleep 0.1; done
  grep -q '^nmt' "${here}/../calls.txt" || { echo "the NMT recipe did not start beside the ASR data"; exit 5; }
  if [ -n "${FAKE_ASR_FAIL:-}" ]; then echo "espeak-ng: boom"; exit 3; fi
fi
"""


@pytest.fixture
def demo_recipes(tmp_path: Path) -> Path:
    write_summary_tables(tmp_path)
    for name in ("nmt", "asr"):
        (tmp_path / name / "run.sh").write_text(FAKE_RECIPE, encoding="utf-8")
    return tmp_path


def test_demo_runs_the_asr_data_beside_the_nmt_recipe_then_prints_the_summary(demo_recipes):
    result = run_cli(["bash", TOOLS / "demo.sh", demo_recipes / "nmt", demo_recipes / "asr", "--verbose", "false"])
    assert result.returncode == 0, cli_output(result)
    calls = (demo_recipes / "calls.txt").read_text().splitlines()
    data = "asr nice=19 --stop_stage 2 --verbose false"  # in the background (it waited for nmt), lowest priority
    assert [call for call in calls if call != data] == [  # the decoding benchmark (stage 7) last, alone
        "nmt nice=0 --stop_stage 6 --verbose false", "nmt nice=0 --stage 10 --stop_stage 10 --verbose false",
        "asr nice=0 --stage 3 --verbose false", "nmt nice=0 --stage 7 --stop_stage 7 --verbose false"]
    assert calls.count(data) == 1
    assert "ASR data ready" in result.stderr
    assert all(text in result.stdout for text in SUMMARY_TABLES.values())


def test_demo_stops_with_the_console_of_failed_asr_data(demo_recipes):
    result = run_cli(["bash", TOOLS / "demo.sh", demo_recipes / "nmt", demo_recipes / "asr"], env={"FAKE_ASR_FAIL": "1"})
    assert result.returncode == 1, cli_output(result)
    console = demo_recipes / "asr" / "data" / "demo_console.log"
    assert f"error: the ASR data stages failed; their console ({console}):" in result.stderr
    assert "    espeak-ng: boom" in result.stderr
    assert not any(line.startswith("asr nice=0") for line in (demo_recipes / "calls.txt").read_text().splitlines())
    assert "| asr table |" not in result.stdout
