"""Shared test fixtures: a tiny learnable parallel corpus binarized for fairseq, and a CLI runner.

The corpus is a deterministic toy "translation": each source word ``s<i>`` maps to a target word
``t<j>`` through a fixed permutation, and the target sentence is the mapped words in reverse
order. A small transformer learns it, so tests can train, decode and score in seconds on a CPU.

Under ``CI=true`` (``.ci/run`` sets it) a skipped test fails instead, unless it is marked ``gpu``: a
missing tool (espeak-ng, g++, cupy/NVRTC, sacremoses, the gettext catalogs) must break CI, not hide
the tests that need it.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
# One OpenMP thread per process unless the caller chose (`make test` sets 1): the suite runs two workers, each
# starting fairseq CLIs, on machines with two cores, where oversubscribed threads slow small ops by 10-30x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
USER_DIR = REPO_ROOT / "user_dir"
# The bin folder of the interpreter running pytest (the project's venv under `make test`): it
# holds fairseq-train/-generate/-preprocess, and its python sees the same packages as the tests.
VENV_BIN = Path(sys.executable).parent

# fairseq-train options that learn the toy language in a few hundred updates on a CPU (add --max-update).
TINY_TRAIN = [
    "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-tokens", "2000",
    "--dropout", "0.0", "--seed", "1", "--cpu", "--num-workers", "0", "--no-progress-bar",
    "--no-epoch-checkpoints", "--disable-validation",
    # one checkpoint, at the end: an epoch of the toy corpus is ~3 updates, and saving after each took more
    # than half of a 100-update run (155 s against 65 s on a loaded 2-core machine)
    "--save-interval", "100000",
]
# A 1+1-layer, 16-dim stock transformer for CLI tests that need a model, not quality.
TINY_TRANSFORMER = [
    "--arch", "transformer", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--encoder-layers", "1",
    "--decoder-layers", "1", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]


def tiny_lsra(decoder_conv: str = "lightweight") -> list:
    """A 2+2-layer, 32-dim lite_transformer: attention beside a dynamic (encoder) / ``decoder_conv``
    (decoder) convolution branch."""
    return [
        "--arch", "lite_transformer_mini", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-branch-type", "attn:1:16:2", "dynamic:default:16:2", "--encoder-glu", "True",
        "--decoder-branch-type", "attn:1:16:2", f"{decoder_conv}:default:16:2",
        "--encoder-layers", "2", "--decoder-layers", "2", "--share-all-embeddings",
    ]


TOY_VOCAB_SIZE = 24
TOY_SPLITS = {"train": 300, "valid": 40, "test": 40}
TOY_LENGTHS = (3, 8)
TOY_SEED = 1234


def toy_pair(rng: random.Random, mapping: Sequence[int]) -> tuple[str, str]:
    """One (source, target) sentence pair of the toy language: mapped words, reversed."""
    words = [rng.randrange(TOY_VOCAB_SIZE) for _ in range(rng.randint(*TOY_LENGTHS))]
    source = " ".join(f"s{w}" for w in words)
    target = " ".join(f"t{mapping[w]}" for w in reversed(words))
    return source, target


def write_toy_corpus(folder: Path, seed: int = TOY_SEED) -> Path:
    """Write ``{train,valid,test}.{src,tgt}`` plain-text files into ``folder``; return it."""
    rng = random.Random(seed)
    mapping = list(range(TOY_VOCAB_SIZE))
    rng.shuffle(mapping)
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in TOY_SPLITS.items():
        pairs = [toy_pair(rng, mapping) for _ in range(size)]
        (folder / f"{split}.src").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
        (folder / f"{split}.tgt").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return folder


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true, turn the skip of a test not marked ``gpu`` into a failure that says why."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and item.get_closest_marker("gpu") is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where only GPU tests may skip: {reason}"


def cli_env(env: Optional[Mapping[str, Optional[str]]] = None) -> Dict[str, str]:
    """The environment ``run_cli`` uses: ours with the venv's bin first on PATH, then ``env``
    applied on top (a value of None removes that variable)."""
    result = dict(os.environ)
    result["PATH"] = os.pathsep.join([str(VENV_BIN), result.get("PATH", "")])
    for key, value in (env or {}).items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def run_cli(
    args: Sequence[Union[str, os.PathLike]],
    cwd: Optional[Union[str, os.PathLike]] = None,
    env: Optional[Mapping[str, Optional[str]]] = None,
    input: Optional[str] = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run a console command (e.g. ``fairseq-train``) with the venv's bin first on PATH.

    Returns the CompletedProcess with stdout and stderr captured as text; asserts nothing, so
    tests can check failures as well as successes.
    """
    return subprocess.run(
        [str(a) for a in args],
        cwd=None if cwd is None else str(cwd),
        env=cli_env(env),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_output(result: subprocess.CompletedProcess) -> str:
    """stdout and stderr of a finished command, for assertion messages and text checks."""
    return f"$ {' '.join(map(str, result.args))}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


@pytest.fixture(scope="session")
def tiny_translation_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Binarized toy corpus (languages ``src``/``tgt``, joined dictionary); returns the data-bin
    folder. The raw text files lie in ``<data-bin>/../raw``."""
    root = tmp_path_factory.mktemp("tiny_translation")
    raw = write_toy_corpus(root / "raw")
    data_bin = root / "data-bin"
    result = run_cli(
        [
            "fairseq-preprocess",
            "--source-lang", "src",
            "--target-lang", "tgt",
            "--trainpref", raw / "train",
            "--validpref", raw / "valid",
            "--testpref", raw / "test",
            "--destdir", data_bin,
            "--joined-dictionary",
            "--workers", "1",
        ]
    )
    assert result.returncode == 0, cli_output(result)
    return data_bin
