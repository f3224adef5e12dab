"""Trust that cannot run code by accident (issue 9, section 2).

Malicious checkpoints are made here, in the test: each payload would create a marker file if it ever
ran, and every test asserts the marker does not exist. They must be refused before and after
``fairseq-accel-trust-checkpoint`` (without ``--allow-code-execution``), a trusted file may unpickle
exactly the globals recorded for it, the file is hashed and loaded from the same bytes, and the
plugin changes nothing outside fairseq checkpoint loading.
"""
from __future__ import annotations

import argparse
import builtins
import cProfile
import functools
import hashlib
import logging
import os
import pathlib
import pickle
import subprocess
import types
from pathlib import Path
from typing import Any, Callable, Tuple

import pytest
import torch

from fairseq import checkpoint_utils
import fairseq_accel.plugin  # noqa: F401  (registers the plugin, installs its fairseq patches)
from fairseq_accel.compat import checkpoint_loading, checkpoint_trust, pickle_globals
from fairseq_accel.compat.checkpoint_files import CheckpointLoadError
from fairseq_accel.compat.pickle_globals import GlobalKind


class _Payload:
    """Unpickling calls ``function(*args)``; every payload here would create ``marker``."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.reduced: Tuple[Any, ...] = (function, args)

    def __reduce__(self) -> Tuple[Any, ...]:
        return self.reduced


def payloads(marker: Path) -> dict:
    """name -> payload object; each would create ``marker`` if unpickled without restriction."""
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "subprocess_call": _Payload(subprocess.call, ["touch", str(marker)]),
        "builtins_exec": _Payload(builtins.exec, touch),
        "cprofile_run": _Payload(cProfile.run, touch),
        "os_system": _Payload(os.system, f"touch {marker}"),
    }


def malicious_checkpoint(folder: Path, name: str, payload: Any) -> Path:
    """A checkpoint-shaped file (model weights, args, meters) with the payload among its values."""
    path = folder / f"{name}.pt"
    state = {"args": argparse.Namespace(arch="transformer", task="translation"),
             "model": {"w": torch.zeros(2)}, "optimizer_history": [], "extra_state": {"hook": payload}}
    torch.save(state, path)
    return path


@pytest.fixture(autouse=True)
def private_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test has its own empty trust store and no in-process trust."""
    monkeypatch.setattr(checkpoint_trust, "_trusted_in_process", {})
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)


@pytest.mark.parametrize("kind", ["subprocess_call", "builtins_exec", "cprofile_run", "os_system"])
def test_malicious_checkpoint_refused_before_and_after_trust(kind: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "payload_ran"
    path = malicious_checkpoint(tmp_path, kind, payloads(marker)[kind])
    with pytest.raises(CheckpointLoadError, match="CAN EXECUTE CODE|torch never unpickles"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    with pytest.raises(SystemExit) as exited:  # the trust CLI refuses without --allow-code-execution
        checkpoint_trust.main([str(path)])
    assert exited.value.code == 2
    assert "can execute code" in capsys.readouterr().err or kind == "os_system"
    assert not checkpoint_trust.trust_store_path().exists()
    with pytest.raises(CheckpointLoadError, match="CAN EXECUTE CODE|torch never unpickles"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert not marker.exists()


def test_refusal_says_plainly_when_a_file_can_execute_code(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    evil = malicious_checkpoint(tmp_path, "evil", payloads(marker)["subprocess_call"])
    odd = malicious_checkpoint(tmp_path, "odd", pathlib.PurePosixPath("/data/corpus"))
    with pytest.raises(CheckpointLoadError) as code_error:
        checkpoint_loading.read_checkpoint(str(evil))
    with pytest.raises(CheckpointLoadError) as value_error:
        checkpoint_loading.read_checkpoint(str(odd))
    assert "CAN EXECUTE CODE" in str(code_error.value) and "subprocess.call (runs programs" in str(code_error.value)
    assert "fairseq-accel-trust-checkpoint" not in str(code_error.value)  # no invitation to trust it
    assert "only builds a value" in str(value_error.value) and "CAN EXECUTE" not in str(value_error.value)
    assert f"fairseq-accel-trust-checkpoint {odd}" in str(value_error.value)
    assert not marker.exists()


def test_classification() -> None:
    classify = pickle_globals.classify_global
    assert classify("argparse.Namespace") is GlobalKind.ALLOWED
    assert classify("pathlib.PurePosixPath") is GlobalKind.BUILDS_VALUE
    for name in ("subprocess.Popen", "builtins.eval", "builtins.getattr", "cProfile.run", "profile.run",
                 "pty.spawn", "importlib.import_module", "ctypes.CDLL", "runpy.run_path", "code.interact",
                 "pickle.loads", "marshal.loads", "dill.loads", "shutil.rmtree", "socket.socket",
                 "multiprocessing.Process", "threading.Thread", "signal.signal", "webbrowser.open",
                 "functools.partial", "operator.methodcaller", "builtins.open"):
        assert classify(name) is GlobalKind.EXECUTES_CODE, name
    assert classify("some_plugin.models.Thing") is GlobalKind.UNKNOWN
    assert pickle_globals.needs_code_execution(["pathlib.PurePosixPath", "some_plugin.Thing"]) == [
        "some_plugin.Thing"]


def test_partial_wrapping_a_dangerous_function_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    wrapped = functools.partial(subprocess.call, ["touch", str(marker)])
    path = malicious_checkpoint(tmp_path, "partial", _Payload(wrapped))
    with pytest.raises(CheckpointLoadError, match=r"CAN EXECUTE CODE.*functools\.partial"):
        checkpoint_loading.read_checkpoint(str(path))
    assert not marker.exists()


def test_allow_code_execution_prints_what_is_allowed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "payload_ran"
    path = malicious_checkpoint(tmp_path, "exec", payloads(marker)["builtins_exec"])
    assert checkpoint_trust.main(["--allow-code-execution", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"WARNING: loading {path} may execute code; allowed: builtins.exec (executes Python code" in out
    assert "extra globals: builtins.exec" in out
    assert "\tbuiltins.exec" in checkpoint_trust.trust_store_path().read_text()
    assert not marker.exists()  # trusting reads the globals; it unpickles nothing


def test_trusted_file_gets_exactly_its_recorded_globals(tmp_path: Path) -> None:
    """A trust record for other globals than the file needs is refused (no discovery of more)."""
    path = malicious_checkpoint(tmp_path, "odd", pathlib.PurePosixPath("/data/corpus"))
    checkpoint_trust.main([str(path)])
    assert checkpoint_loading.read_checkpoint(str(path))["extra_state"]["hook"] == pathlib.PurePosixPath("/data/corpus")
    store = checkpoint_trust.trust_store_path()
    store.write_text(store.read_text().replace("pathlib.PurePosixPath", "pathlib.PureWindowsPath"))
    checkpoint_trust._trusted_in_process.clear()  # a new process reads the store
    with pytest.raises(CheckpointLoadError,
                       match="trusted for the globals pathlib.PureWindowsPath but now needs pathlib.PurePosixPath"):
        checkpoint_loading.read_checkpoint(str(path))


def test_hash_and_load_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is swapped right after it is hashed: the load must still be of the bytes hashed."""
    path = malicious_checkpoint(tmp_path, "odd", pathlib.PurePosixPath("/trusted"))
    checkpoint_trust.trust_checkpoint(str(path))
    swapped = malicious_checkpoint(tmp_path, "swap", pathlib.PurePosixPath("/swapped")).read_bytes()

    def sha256_then_swap(data: bytes = b"") -> Any:
        digest = hashlib.sha256(data)
        path.write_bytes(swapped)  # what an attacker racing the load would do
        return digest

    monkeypatch.setattr(checkpoint_loading, "hashlib", types.SimpleNamespace(sha256=sha256_then_swap))
    state = checkpoint_loading.read_checkpoint(str(path))
    assert state["extra_state"]["hook"] == pathlib.PurePosixPath("/trusted")
    assert path.read_bytes() == swapped  # the swap did happen


def test_weights_only_off_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(checkpoint_loading, "_warned_weights_only_off", False)
    marker = tmp_path / "payload_ran"
    evil = malicious_checkpoint(tmp_path, "evil", payloads(marker)["builtins_exec"])
    plain = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.ones(1)}}, plain)
    with caplog.at_level(logging.WARNING, logger=checkpoint_loading.__name__):
        checkpoint_loading.read_checkpoint(str(plain))
        checkpoint_loading.read_checkpoint(str(plain))
        with pytest.raises(CheckpointLoadError, match="CAN EXECUTE CODE"):  # still refused here
            checkpoint_loading.read_checkpoint(str(evil))
    warnings = [r.getMessage() for r in caplog.records if "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "fairseq_accel's own loads of local checkpoint files stay weights-only" in warnings[0]
    assert "every torch.load outside them that does not pass weights_only" in warnings[0]
    assert "can now run code" in warnings[0]
    assert not marker.exists()


def test_weights_only_off_warning_is_what_torch_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the warning says, checked against torch with a harmless non-allowlisted object: with the
    variable set, a torch.load without weights_only unpickles anything; weights_only=True still refuses."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = malicious_checkpoint(tmp_path, "odd", pathlib.PurePosixPath("/data/corpus"))
    with pytest.warns(UserWarning, match="forcing weights_only=False"):
        assert torch.load(path)["extra_state"]["hook"] == pathlib.PurePosixPath("/data/corpus")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointLoadError, match="not loaded"):
        checkpoint_loading.read_checkpoint(str(path))


def test_weights_only_off_warns_on_remote_paths_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A remote-store path is loaded by fairseq's own torch.load (no weights_only): warn there too."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(checkpoint_loading, "_warned_weights_only_off", False)
    monkeypatch.setattr(checkpoint_loading, "_is_local", lambda path: False)  # as for s3://... paths
    plain = tmp_path / "plain.pt"  # the least fairseq's upgrade step accepts; nothing outside the allowlist
    history = [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam",
                "lr_scheduler_state": {"best": None}, "num_updates": 0}]
    torch.save({"cfg": None, "model": {}, "optimizer_history": history, "extra_state": {}}, plain)
    with caplog.at_level(logging.WARNING, logger=checkpoint_loading.__name__):
        with pytest.warns(UserWarning, match="forcing weights_only=False"):  # torch's own words
            checkpoint_utils.load_checkpoint_to_cpu(str(plain))
    assert any("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set" in r.getMessage() for r in caplog.records)


def test_missing_checkpoint_is_a_file_not_found_error(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.pt", tmp_path):
        with pytest.raises(FileNotFoundError):
            checkpoint_utils.load_checkpoint_to_cpu(str(path))


def test_allowlist_is_per_load_not_global(tmp_path: Path) -> None:
    """A fairseq load allows argparse.Namespace; torch.load outside it still refuses it."""
    path = tmp_path / "namespace.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": {}}, path)
    before = list(torch.serialization.get_safe_globals())
    assert checkpoint_loading.read_checkpoint(str(path))["args"].lr == 0.1
    after = list(torch.serialization.get_safe_globals())
    assert len(after) == len(before) and set(after) == set(before)  # torch keeps them in a set: order varies
    listed = {entry if isinstance(entry, str) else getattr(entry, "__qualname__", str(entry)) for entry in before}
    assert "Namespace" not in listed and not any(isinstance(e, tuple) and e[1] == "argparse.Namespace" for e in before)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_ctranslate2_conversion_goes_through_the_checks(tmp_path: Path) -> None:
    from fairseq_accel import benchmarking

    marker = tmp_path / "payload_ran"
    path = malicious_checkpoint(tmp_path, "evil", payloads(marker)["subprocess_call"])
    args = types.SimpleNamespace(path=str(path), data=str(tmp_path), ct2_from=None)
    work = types.SimpleNamespace(task=types.SimpleNamespace(cfg=types.SimpleNamespace(source_lang="src",
                                                                                        target_lang="tgt")))
    with pytest.raises(CheckpointLoadError, match="CAN EXECUTE CODE"):
        benchmarking._ct2_convert(args, work, "int8", tmp_path / "ct2")
    assert torch.load.__module__ == "torch.serialization"  # restored after the conversion
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04" + bytes(64)])
def test_trusting_a_file_that_is_no_checkpoint_is_one_line(content: bytes, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exited:
        checkpoint_trust.main([str(path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated or corrupt" in err[0] and str(path) in err[0], err
    assert not checkpoint_trust.trust_store_path().exists()
