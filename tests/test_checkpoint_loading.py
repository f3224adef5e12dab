"""fairseq checkpoints load under torch >= 2.6 with the plugin, safely, and bad ones fail clearly.

A tiny stock ``transformer`` is trained for 3 updates with ``--eval-bleu`` (so its saved meters
hold numpy arrays as well as the argparse.Namespace model config); then the fairseq CLIs load it
through ``--user-dir user_dir`` with no TORCH_FORCE_* variable, broken or foreign checkpoints must
each end in one ``CheckpointLoadError`` line that names the problem and the fix, and the startup
hook (``fairseq_accel_startup``, installed by pip as a .pth) must do the same for stock CLIs
without ``--user-dir``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import pickle
import pickletools
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set

import pytest
import torch

from conftest import REPO_ROOT, USER_DIR, cli_env, cli_output, run_cli

from fairseq import checkpoint_utils
from fairseq_accel.compat import checkpoint_loading, checkpoint_trust, pickle_globals
from fairseq_accel.compat.checkpoint_files import CheckpointLoadError

TINY_TRANSFORMER = [
    "--arch", "transformer",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--share-all-embeddings",
]
FAST_TRAIN = [
    "--cpu", "--seed", "1", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "1000",
    "--no-progress-bar", "--log-format", "simple", "--num-workers", "0", "--no-epoch-checkpoints",
]
# Length cap: an untrained model would otherwise decode up to 200 tokens per sentence.
FAST_DECODE = ["--cpu", "--beam", "2", "--max-len-a", "1", "--max-len-b", "2", "--num-workers", "0"]
# The variable that turns weights_only off globally must not be what makes loading work.
NO_UNSAFE_ENV: Dict[str, Optional[str]] = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": None}


def last_line(text: str) -> str:
    """Last non-blank line: where a CLI's traceback puts the exception message."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def generate(
    data_bin: Path,
    checkpoint: Path,
    *extra: str,
    user_dir: bool = True,
    env: Optional[Dict[str, Optional[str]]] = None,
) -> subprocess.CompletedProcess:
    """fairseq-generate on the test split, with the plugin unless ``user_dir`` is False."""
    args = ["fairseq-generate", data_bin, "--path", checkpoint, "--batch-size", "16", *FAST_DECODE]
    if user_dir:
        args += ["--user-dir", USER_DIR]
    return run_cli([*args, *extra], env={**NO_UNSAFE_ENV, **(env or {})})


def expect_load_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed and its last stderr line is our error containing every fragment."""
    assert result.returncode != 0, cli_output(result)
    line = last_line(result.stderr)
    assert re.match(r"fairseq_accel\.compat\.checkpoint_files\.Checkpoint\w*Error: ", line), cli_output(result)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in:\n{line}"
    return line


def pickled_globals(checkpoint: Path) -> Set[str]:
    """Every global a zip-format torch checkpoint's pickle names (torch.save writes pickle
    protocol 2, where each one is a GLOBAL opcode)."""
    with zipfile.ZipFile(checkpoint) as archive:
        (pkl_name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        data = archive.read(pkl_name)
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def rewrite_checkpoint(source: Path, target: Path, edit: Callable[[dict], None]) -> Path:
    """Load our own (trusted) checkpoint without restrictions, edit the state, save it again."""
    state = torch.load(source, map_location="cpu", weights_only=False)
    edit(state)
    torch.save(state, target)
    return target


@pytest.fixture(scope="module")
def trained(tiny_translation_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Save dir of a stock transformer trained 3 updates by fairseq-train with the plugin."""
    save_dir = tmp_path_factory.mktemp("ckpt") / "transformer"
    result = run_cli(
        [
            "fairseq-train", tiny_translation_data, *TINY_TRANSFORMER, *FAST_TRAIN,
            "--max-update", "3", "--save-dir", save_dir, "--user-dir", USER_DIR,
            "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_a": 1, "max_len_b": 2}',
        ],
        env=NO_UNSAFE_ENV,
    )
    assert result.returncode == 0, cli_output(result)
    assert (save_dir / "checkpoint_last.pt").is_file(), cli_output(result)
    return save_dir


@pytest.fixture(scope="module")
def foreign_arch_checkpoint(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained checkpoint, claiming an architecture that no loaded plugin registers."""

    def rename_arch(state: dict) -> None:
        state["cfg"]["model"].arch = "plugin_only_arch"
        state["cfg"]["model"]._name = "plugin_only_arch"

    target = tmp_path_factory.mktemp("foreign") / "foreign.pt"
    return rewrite_checkpoint(trained / "checkpoint_last.pt", target, rename_arch)


# ----------------------------------------------------------------------------------------------
# The CLIs work with the plugin.
# ----------------------------------------------------------------------------------------------
def test_checkpoint_needs_exactly_the_allowlisted_globals(trained: Path) -> None:
    """Documents what a real fairseq 0.12 checkpoint pickles beyond tensors, and that the
    allowlist plus torch's defaults cover it."""
    used = pickled_globals(trained / "checkpoint_last.pt")
    assert "argparse.Namespace" in used  # cfg['model'] of the add_args-configured transformer
    assert any(name.endswith("multiarray._reconstruct") for name in used)  # --eval-bleu meters
    allowed = set(torch.serialization._weights_only_unpickler._get_allowed_globals())
    ours = {entry.name for entry in pickle_globals.SAFE_GLOBALS}
    assert used <= allowed | ours, used - allowed - ours


def test_generate_with_user_dir(trained: Path, tiny_translation_data: Path) -> None:
    env = cli_env(NO_UNSAFE_ENV)
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in env
    result = run_cli(
        ["fairseq-generate", tiny_translation_data, "--path", trained / "checkpoint_last.pt",
         "--batch-size", "16", *FAST_DECODE, "--user-dir", "user_dir"],
        cwd=REPO_ROOT,  # `--user-dir user_dir` as typed in a checkout
        env=NO_UNSAFE_ENV,
    )
    assert result.returncode == 0, cli_output(result)
    assert "Generate test with beam=2" in result.stdout, cli_output(result)
    assert sum(line.startswith("H-") for line in result.stdout.splitlines()) == 40


def test_train_restore_file(trained: Path, tiny_translation_data: Path, tmp_path: Path) -> None:
    result = run_cli(
        ["fairseq-train", tiny_translation_data, *TINY_TRANSFORMER, *FAST_TRAIN,
         "--max-update", "5", "--save-dir", tmp_path / "resumed", "--user-dir", USER_DIR,
         "--restore-file", trained / "checkpoint_last.pt"],
        env=NO_UNSAFE_ENV,
    )
    assert result.returncode == 0, cli_output(result)
    output = result.stdout + result.stderr
    assert "Loaded checkpoint" in output and "@ 3 updates" in output, cli_output(result)
    assert "num_updates 5" in output, cli_output(result)


def test_interactive(trained: Path, tiny_translation_data: Path) -> None:
    result = run_cli(
        ["fairseq-interactive", tiny_translation_data, "--path", trained / "checkpoint_last.pt",
         "--source-lang", "src", "--target-lang", "tgt", *FAST_DECODE, "--user-dir", USER_DIR],
        input="s1 s2 s3\n",
        env=NO_UNSAFE_ENV,
    )
    assert result.returncode == 0, cli_output(result)
    assert any(line.startswith("H-0\t") for line in result.stdout.splitlines()), cli_output(result)


# ----------------------------------------------------------------------------------------------
# Without --user-dir: stock fairseq fails; the startup hook makes it load and explain.
# ----------------------------------------------------------------------------------------------
def run_generate_in_python(data_bin: Path, checkpoint: Path, prelude: str) -> subprocess.CompletedProcess:
    """fairseq-generate's own entry point (no --user-dir) in a python that first runs ``prelude``."""
    code = (
        f"{prelude}\nimport sys\nfrom fairseq_cli.generate import cli_main\n"
        "sys.argv[0] = 'fairseq-generate'\ncli_main()\n"
    )
    args = [data_bin, "--path", checkpoint, "--batch-size", "16", *FAST_DECODE]
    return run_cli([sys.executable, "-c", code, *args], env={**NO_UNSAFE_ENV, "PYTHONPATH": str(REPO_ROOT)})


# What a process gets when nothing of the plugin runs (the hook's finder, if pip installed it, removed).
NO_PLUGIN = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, '__module__', '') != 'fairseq_accel_startup']"
)
HOOK = "import fairseq_accel_startup  # what fairseq_accel_startup.pth does at interpreter start"


def startup_hook_installed() -> bool:
    """Whether pip installed the plugin (and so its .pth) into this Python's site-packages."""
    folders = site.getsitepackages() + [site.getusersitepackages()]
    return any((Path(folder) / "fairseq_accel_startup.pth").is_file() for folder in folders)


def test_stock_fairseq_without_plugin_fails(trained: Path, tiny_translation_data: Path) -> None:
    """Why the plugin is needed: with no plugin code, torch >= 2.6 refuses fairseq's checkpoint."""
    result = run_generate_in_python(tiny_translation_data, trained / "checkpoint_last.pt", NO_PLUGIN)
    assert result.returncode != 0, cli_output(result)
    assert "Weights only load failed" in result.stderr, cli_output(result)
    assert "argparse.Namespace" in result.stderr, cli_output(result)


def test_startup_hook_loads_without_user_dir(
    trained: Path, tiny_translation_data: Path, foreign_arch_checkpoint: Path
) -> None:
    result = run_generate_in_python(tiny_translation_data, trained / "checkpoint_last.pt", HOOK)
    assert result.returncode == 0, cli_output(result)
    assert "Generate test with beam=2" in result.stdout, cli_output(result)
    refused = run_generate_in_python(tiny_translation_data, foreign_arch_checkpoint, HOOK)
    expect_load_error(refused, "model architecture 'plugin_only_arch'", f"pass --user-dir {USER_DIR}")


COMPAT_MODULES = ("pickle_globals", "checkpoint_files", "checkpoint_trust", "checkpoint_loading")


def test_startup_hook_is_lazy_and_registers_no_models() -> None:
    """At start the hook only adds a finder; fairseq, torch and the plugin load when used, and the
    compat modules it loads by path are the very ones the plugin uses once imported."""
    code = (
        f"{HOOK}\nimport sys\n"
        "assert not {'torch', 'fairseq', 'fairseq_accel'} & set(sys.modules), sorted(sys.modules)\n"
        "import fairseq.checkpoint_utils as cu\n"
        "assert cu.load_checkpoint_to_cpu.__fairseq_accel_wrapped__\n"
        "assert 'fairseq_accel.models' not in sys.modules and 'fairseq_accel' not in sys.modules\n"
        "assert 'fairseq_accel.compat' not in sys.modules\n"
        f"hooked = {{name: sys.modules['fairseq_accel.compat.' + name] for name in {COMPAT_MODULES!r}}}\n"
        "import fairseq_accel.plugin, fairseq_accel.compat.checkpoint_loading as loading\n"
        "from fairseq_accel.compat import checkpoint_files, checkpoint_trust, pickle_globals\n"
        "assert loading is hooked['checkpoint_loading'] and fairseq_accel.plugin.COMPAT_PATCHES[0] is loading\n"
        "assert checkpoint_trust is hooked['checkpoint_trust'] and pickle_globals is hooked['pickle_globals']\n"
        "assert checkpoint_files is hooked['checkpoint_files']\n"
        "print('ok')\n"
    )
    result = run_cli([sys.executable, "-c", code], env={"PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), cli_output(result)


def test_startup_hook_failure_is_one_warning_and_leaves_no_modules(tmp_path: Path) -> None:
    """A compat module that fails to execute (here the third of four) gives one warning, fairseq stays
    stock, and none of the modules the hook registered stays in sys.modules (not even the two
    that executed), so a later ``import fairseq_accel.plugin`` starts afresh. The packages' ``__init__``
    files raise if run: the hook must load the modules by path alone."""
    package = tmp_path / "fairseq_accel"
    (package / "compat").mkdir(parents=True)
    for init in (package / "__init__.py", package / "compat" / "__init__.py"):
        init.write_text("raise AssertionError('the startup hook must not run package __init__ files')\n")
    for name in COMPAT_MODULES:
        shutil.copy(REPO_ROOT / "fairseq_accel" / "compat" / f"{name}.py", package / "compat")
    (package / "compat" / "checkpoint_trust.py").write_text("raise RuntimeError('broken compat module')\n")
    code = (
        "import sys, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    {HOOK}\n"
        "    import fairseq.checkpoint_utils as cu\n"
        "hook_warnings = [str(w.message) for w in caught if 'startup hook' in str(w.message)]\n"
        "assert len(hook_warnings) == 1 and 'broken compat module' in hook_warnings[0], hook_warnings\n"
        "assert not getattr(cu.load_checkpoint_to_cpu, '__fairseq_accel_wrapped__', False)\n"
        "left = [name for name in sys.modules if name.startswith('fairseq_accel.')]\n"
        "assert not left, left\n"
        "print('ok')\n"
    )
    path = os.pathsep.join([str(tmp_path), str(REPO_ROOT)])  # the broken copy shadows the real package
    result = run_cli([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": path})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), cli_output(result)


@pytest.mark.skipif(not startup_hook_installed(), reason="fairseq_accel is not pip-installed in this Python")
def test_installed_startup_hook_makes_stock_cli_work(trained: Path, tiny_translation_data: Path) -> None:
    result = generate(tiny_translation_data, trained / "checkpoint_last.pt", user_dir=False)
    assert result.returncode == 0, cli_output(result)


@pytest.fixture(scope="module")
def built_wheels(tmp_path_factory: pytest.TempPathFactory) -> List[Path]:
    """A regular wheel and a PEP 660 editable wheel (what pip install -e installs) of the plugin,
    built offline from a copy of the checkout so that no build files land in it, without the C++ sources:
    the wheels' .pth is what is tested, and compiling the kernels for both took four minutes of the suite
    (the kernels themselves are built by the suite's own pip install)."""
    source = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "fairseq_accel_startup.py", "README.md"):
        if (REPO_ROOT / name).is_file():
            shutil.copy(REPO_ROOT / name, source / name)
    if not (source / "README.md").is_file():  # setup.py reads it
        (source / "README.md").write_text("fairseq_accel\n")
    shutil.copytree(REPO_ROOT / "fairseq_accel", source / "fairseq_accel",
                    ignore=shutil.ignore_patterns("__pycache__", "csrc", "*.so"))
    out = source / "wheels"
    regular = run_cli([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                       "--no-index", "-q", "-w", out, source])
    assert regular.returncode == 0, cli_output(regular)
    editable = run_cli([sys.executable, "-c",
                        f"import setuptools.build_meta as b; b.build_editable({str(out)!r})"], cwd=source)
    assert editable.returncode == 0, cli_output(editable)
    wheels = sorted(out.glob("fairseq_accel-*.whl"))
    assert len(wheels) == 2 and any("editable" in w.name for w in wheels), wheels
    return wheels


def test_wheels_ship_the_startup_pth(built_wheels: List[Path]) -> None:
    """Both wheels carry the .pth at their root and in RECORD: pip installs and uninstalls it."""
    for wheel in built_wheels:
        with zipfile.ZipFile(wheel) as archive:
            line = archive.read("fairseq_accel_startup.pth").decode()
            assert line.startswith("import ") and "fairseq_accel_startup" in line, line
            (record,) = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
            lines = archive.read(record).decode().splitlines()
            assert any(line.startswith("fairseq_accel_startup.pth,sha256=") for line in lines), wheel.name


def test_startup_pth_line_is_harmless_without_the_module(built_wheels: List[Path]) -> None:
    """Python runs the .pth line at every start; once the module is gone (a deleted checkout
    behind an editable install) it must do nothing rather than print an error each time."""
    with zipfile.ZipFile(built_wheels[0]) as archive:
        line = archive.read("fairseq_accel_startup.pth").decode().strip()
    for module, expect_loaded in (("fairseq_accel_startup", True), ("gone_startup_module", False)):
        probe = f"import sys\nprint({module!r} in sys.modules)"
        code = f"{line.replace('fairseq_accel_startup', module)}\n{probe}"
        result = run_cli([sys.executable, "-c", code], env={"PYTHONPATH": str(REPO_ROOT)})
        assert result.returncode == 0 and not result.stderr.strip(), cli_output(result)
        assert result.stdout.strip() == str(expect_loaded), cli_output(result)


# ----------------------------------------------------------------------------------------------
# Bad checkpoints: one clear line each.
# ----------------------------------------------------------------------------------------------
def test_missing_checkpoint(trained: Path, tiny_translation_data: Path) -> None:
    result = generate(tiny_translation_data, trained / "checkpoint_nope.pt")
    expect_load_error(
        result, "checkpoint file not found", str(trained / "checkpoint_nope.pt"),
        "checkpoint_best.pt, checkpoint_last.pt",
    )


def test_truncated_checkpoint(trained: Path, tiny_translation_data: Path, tmp_path: Path) -> None:
    data = (trained / "checkpoint_last.pt").read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(data[: len(data) // 2])
    fragments = (str(half), f"({len(data) // 2} bytes)", "truncated or corrupt",
                 "the file is not a complete torch zip archive", "re-copy or re-train")
    expect_load_error(generate(tiny_translation_data, half), *fragments)
    resumed = run_cli(  # the --restore-file path goes through the same loader
        ["fairseq-train", tiny_translation_data, *TINY_TRANSFORMER, *FAST_TRAIN, "--max-update", "4",
         "--save-dir", tmp_path / "resumed", "--user-dir", USER_DIR, "--restore-file", half],
        env=NO_UNSAFE_ENV,
    )
    expect_load_error(resumed, *fragments)


def test_unregistered_arch(tiny_translation_data: Path, foreign_arch_checkpoint: Path) -> None:
    result = generate(tiny_translation_data, foreign_arch_checkpoint)
    expect_load_error(
        result, "model architecture 'plugin_only_arch'", "not registered", f"--user-dir {USER_DIR}",
        "or the --user-dir of the plugin that defines it",
    )


def test_unlisted_global_refused_then_loaded_once_trusted(
    trained: Path, tiny_translation_data: Path, tmp_path: Path
) -> None:
    def add_path_object(state: dict) -> None:
        state["extra_state"]["corpus"] = pathlib.PurePosixPath("/data/corpus")

    odd = rewrite_checkpoint(trained / "checkpoint_last.pt", tmp_path / "odd.pt", add_path_object)
    trust_env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    refused = generate(tiny_translation_data, odd, env=trust_env)
    name = f"{pathlib.PurePosixPath.__module__}.PurePosixPath"
    expect_load_error(refused, str(odd), name, "not loaded", f"fairseq-accel-trust-checkpoint {odd}")

    trust = run_cli(
        [sys.executable, "-c",
         "import sys; from fairseq_accel.compat.checkpoint_trust import main; sys.exit(main(sys.argv[1:]))",
         odd],
        env={**trust_env, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert trust.returncode == 0, cli_output(trust)
    assert f"extra globals: {name}" in trust.stdout, cli_output(trust)

    loaded = generate(tiny_translation_data, odd, env=trust_env)
    assert loaded.returncode == 0, cli_output(loaded)
    assert "loading trusted checkpoint" in loaded.stderr, cli_output(loaded)


def test_trust_is_bound_to_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint_trust, "_trusted_in_process", {})
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = tmp_path / "odd.pt"
    torch.save({"model": {}, "corpus": pathlib.PurePosixPath("/data/corpus")}, path)

    def recorded() -> Optional[checkpoint_trust.TrustEntry]:
        return checkpoint_trust.trust_entry(hashlib.sha256(path.read_bytes()).hexdigest())

    assert recorded() is None
    checkpoint_trust.trust_checkpoint(str(path), persist=True)
    monkeypatch.setattr(checkpoint_trust, "_trusted_in_process", {})  # a new process
    assert recorded().allowed == {"pathlib.PurePosixPath"}
    assert checkpoint_trust.trust_store_path().is_file()
    torch.save({"model": {}, "corpus": pathlib.PurePosixPath("/data/other")}, path)
    assert recorded() is None  # changed content: trust is void


# ----------------------------------------------------------------------------------------------
# In-process units: safety is kept, the loaders are wrapped, legacy checkpoints are checked.
# ----------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this calls print(); a real attack would call something worse."""

    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_weights_only_still_refuses_arbitrary_globals(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin is imported (module level) and torch.load keeps refusing code-running pickles."""
    monkeypatch.setattr(checkpoint_trust, "_trusted_in_process", {})
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    calls_os = tmp_path / "os_system.pt"
    torch.save({"model": {}, "hook": os.system}, calls_os)
    runs_code = tmp_path / "runs_code.pt"
    torch.save({"model": {}, "obj": _RunsCode()}, runs_code)
    custom = tmp_path / "custom.pt"
    torch.save({"model": {}, "ns": argparse.Namespace(x=_RunsCode.__name__), "cls": _RunsCode}, custom)
    for path in (calls_os, runs_code, custom):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path)  # default weights_only
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
    assert "unpickling ran code" not in capsys.readouterr().out

    with pytest.raises(CheckpointLoadError, match=r"references posix\.system|references nt\.system"):
        checkpoint_utils.load_checkpoint_to_cpu(str(calls_os))
    with pytest.raises(CheckpointLoadError, match="torch never unpickles"):  # trust never unblocks os/sys
        checkpoint_trust.trust_checkpoint(str(calls_os), allow_code_execution=True)
    with pytest.raises(CheckpointLoadError, match="torch never unpickles"):
        checkpoint_utils.load_checkpoint_to_cpu(str(calls_os))
    with pytest.raises(CheckpointLoadError, match=r"CAN EXECUTE CODE.*builtins\.print"):
        checkpoint_utils.load_checkpoint_to_cpu(str(runs_code))
    assert "unpickling ran code" not in capsys.readouterr().out


def test_fairseq_loaders_are_wrapped() -> None:
    """Fails loudly if a fairseq release renames the functions we wrap."""
    for name in ("load_checkpoint_to_cpu", "load_model_ensemble_and_task", "_upgrade_state_dict", "load_checkpoint"):
        assert getattr(getattr(checkpoint_utils, name), "__fairseq_accel_wrapped__", False), name
    checkpoint_loading.install()  # idempotent: no double wrapping
    wrapped = checkpoint_utils.load_checkpoint_to_cpu
    assert not getattr(wrapped.__wrapped__, "__fairseq_accel_wrapped__", False)


def test_allowlist_is_explicit_and_documented() -> None:
    names = [entry.name for entry in pickle_globals.SAFE_GLOBALS]
    assert len(names) == len(set(names))
    assert {"argparse.Namespace", "numpy.ndarray", "numpy.dtype",
            "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
            "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"} <= set(names)
    assert all(entry.reason for entry in pickle_globals.SAFE_GLOBALS)
    assert not any(name.split(".")[0] in {"builtins", "os", "sys", "subprocess"} for name in names)
    assert all(isinstance(entry.obj, type) or callable(entry.obj) for entry in pickle_globals.SAFE_GLOBALS)


def test_numpy_values_load_weights_only(tmp_path: Path) -> None:
    """The numpy values fairseq meters hold load through the plugin's loader (torch.load alone
    refuses them: the allowlist is applied per fairseq load, not globally)."""
    import numpy as np

    path = tmp_path / "numpy.pt"
    values = {"counts": np.array([9, 0, 0, 0]), "score": np.float64(0.5), "n": np.int32(3),
              "half": np.zeros(2, dtype=np.float16), "flag": np.bool_(True)}
    torch.save(values, path)
    loaded = checkpoint_loading.read_checkpoint(str(path))
    assert loaded["counts"].tolist() == [9, 0, 0, 0] and loaded["score"] == 0.5
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    torch.save({"objects": np.array([1, "x"], dtype=object)}, path)
    with pytest.raises(CheckpointLoadError, match="not loaded"):  # object arrays are not allowlisted
        checkpoint_loading.read_checkpoint(str(path))


def test_legacy_args_checkpoint_with_unregistered_arch(tmp_path: Path) -> None:
    """fairseq < 0.10 checkpoints keep the config in state['args']; fairseq's upgrade step would
    raise a bare KeyError for an unknown arch, we name it first."""
    path = tmp_path / "legacy.pt"
    args = argparse.Namespace(arch="old_plugin_arch", task="translation", user_dir="/old/plugin")
    torch.save({"args": args, "model": {}, "optimizer_history": [], "extra_state": {}}, path)
    with pytest.raises(CheckpointLoadError, match=r"'old_plugin_arch'.*trained with --user-dir /old/plugin"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))


def test_folder_and_garbage_paths(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointLoadError, match="is a folder.*checkpoint_last.pt"):
        checkpoint_utils.load_checkpoint_to_cpu(str(trained))
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(CheckpointLoadError, match=r"\(16 bytes\) is truncated or corrupt"):
        checkpoint_utils.load_checkpoint_to_cpu(str(garbage))
    with pytest.raises(CheckpointLoadError, match="the folder .*missing_dir does not exist"):
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "missing_dir" / "x.pt"))


# ----------------------------------------------------------------------------------------------
# Issue 9: corrupt data.pkl, an explicit --restore-file that is not a file, a dictionary size mismatch.
# ----------------------------------------------------------------------------------------------
def test_zeroed_region_in_data_pkl_is_corrupt(trained: Path, tmp_path: Path) -> None:
    data = bytearray((trained / "checkpoint_last.pt").read_bytes())
    with zipfile.ZipFile(trained / "checkpoint_last.pt") as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # local header size
    data[start + 40: start + 90] = bytes(50)
    zeroed = tmp_path / "zeroed.pt"
    zeroed.write_bytes(bytes(data))
    with pytest.raises(CheckpointLoadError, match=r"is truncated or corrupt: its pickle data is damaged"):
        checkpoint_utils.load_checkpoint_to_cpu(str(zeroed))


@pytest.mark.parametrize("kind", ["mistyped", "folder"])
def test_explicit_restore_file_must_exist(kind: str, trained: Path, tiny_translation_data: Path,
                                          tmp_path: Path) -> None:
    restore = trained / "checkpoint_lats.pt" if kind == "mistyped" else trained
    result = run_cli(
        ["fairseq-train", tiny_translation_data, *TINY_TRANSFORMER, *FAST_TRAIN, "--max-update", "1",
         "--save-dir", tmp_path / "save", "--user-dir", USER_DIR, "--restore-file", restore],
        env=NO_UNSAFE_ENV,
    )
    what = "does not exist" if kind == "mistyped" else "is a folder"
    expect_load_error(result, f"--restore-file {restore} {what}", "checkpoint_last.pt")
    assert not (tmp_path / "save" / "checkpoint_last.pt").exists()  # nothing was trained


def test_dictionary_size_mismatch_is_one_line(trained: Path, tiny_translation_data: Path, tmp_path: Path) -> None:
    bigger = tmp_path / "data-bin"
    shutil.copytree(tiny_translation_data, bigger)
    for name in ("dict.src.txt", "dict.tgt.txt"):  # joined dictionary: both grow the same way
        with open(bigger / name, "a", encoding="utf-8") as f:
            f.write("".join(f"extra{i} 1\n" for i in range(8)))
    result = generate(bigger, trained / "checkpoint_last.pt")
    line = expect_load_error(result, str(trained / "checkpoint_last.pt"), "embed_tokens.weight",
                             "in the checkpoint but", "likely cause: the dictionary used now has")
    assert "size mismatch" not in result.stderr.replace(line, ""), cli_output(result)  # no raw torch error
