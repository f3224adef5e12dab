"""Load fairseq 0.12 checkpoints under torch >= 2.6 safely, and explain in one line why a load fails.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``, and fairseq 0.12 checkpoints hold
a few pickled globals it refuses, so stock ``fairseq-generate``, ``fairseq-interactive`` and
``fairseq-train --restore-file`` die with ``UnpicklingError``. :func:`install` (called by
``fairseq_accel``, which ``--user-dir user_dir`` imports before fairseq loads any checkpoint) fixes
that without turning safety off:

* ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (every fairseq load path calls it through the
  module attribute) is replaced by :func:`read_checkpoint` plus fairseq's own post-processing. It
  reads the file once into memory, checks, hashes and unpickles those same bytes (no swap between
  check and load), with the allowlist (:mod:`~fairseq_accel.compat.pickle_globals`) and the
  globals the user trusted this content for (:mod:`~fairseq_accel.compat.checkpoint_trust`)
  allowed for that one load only (``torch.serialization.safe_globals``): torch's global allowlist
  is never changed, so nothing changes outside fairseq checkpoint loading.
* A missing file, a folder, a truncated or corrupt file, a global outside the allowlist, an
  unregistered model architecture or task, a parameter whose shape differs from the model's (a
  dictionary of another size) and an explicit ``--restore-file`` that does not exist each raise one
  :class:`~fairseq_accel.compat.checkpoint_files.CheckpointLoadError` whose message names the
  problem and the fix (a missing file raises ``CheckpointNotFoundError``, which
  ``except FileNotFoundError`` also catches).

Without ``--user-dir`` (a stock ``fairseq-generate`` run), nothing imports ``fairseq_accel``, so an
installed plugin (pip install, normal or ``-e``) also ships a startup hook:
``fairseq_accel_startup.pth`` imports the stdlib-only ``fairseq_accel_startup`` at interpreter start,
which waits until a process imports ``fairseq.checkpoint_utils`` and then executes this module and
the compat modules it imports by path (not the packages, so no models are registered) and calls
:func:`install`. These modules therefore import nothing else from the plugin, import each other
only as ``from fairseq_accel.compat.<module> import <name>``, and :func:`install` is idempotent.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import difflib
import functools
import hashlib
import importlib
import inspect
import io
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from fairseq_accel.compat.checkpoint_files import (
    COMPRESSED_KEY,
    CheckpointLoadError,
    CheckpointNotFoundError,
    checkpoint_globals,
    corrupt_file_message,
    folder_listing,
    missing_file_message,
    read_checkpoint_bytes,
)
from fairseq_accel.compat.checkpoint_trust import TrustEntry, blocked_message, trust_entry
from fairseq_accel.compat.pickle_globals import (
    SAFE_GLOBALS,
    describe_global,
    needs_code_execution,
    torch_blocked,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Diagnosis of a bad file.
# --------------------------------------------------------------------------------------------
def _is_local(path: str) -> bool:
    """False for paths fairseq resolves through PathManager (remote stores); those are not checked."""
    from fairseq.file_io import PathManager

    return not PathManager.path_requires_pathmanager(path)


def _unsafe_message(path: str, names: Sequence[str], trusted: Optional[TrustEntry]) -> str:
    """Why a file with globals outside the allowlist was refused, and what (if anything) to do."""
    blocked = torch_blocked(names)
    if blocked:
        return blocked_message(path, blocked)
    if trusted is not None:
        return (
            f"checkpoint {path} was not loaded: it was trusted for the globals "
            f"{', '.join(sorted(trusted.allowed)) or '(none)'} but now needs {', '.join(names)}; "
            f"trust it again only if you know why: fairseq-accel-trust-checkpoint {path}"
        )
    risky = needs_code_execution(names)
    if risky:
        return (
            f"checkpoint {path} was not loaded: it CAN EXECUTE CODE when loaded, through "
            f"{'; '.join(describe_global(n) for n in risky)}; a model checkpoint never needs this, do not use "
            "this file unless you know what it runs"
        )
    return (
        f"checkpoint {path} was not loaded: it contains pickled {', '.join(names)}, which is not on "
        "fairseq_accel's weights-only allowlist (it only builds a value); if you trust this file, run "
        f"`fairseq-accel-trust-checkpoint {path}` (or call "
        "fairseq_accel.compat.checkpoint_trust.trust_checkpoint(path) in Python) and load it again"
    )


def _torch_reason(error: BaseException) -> str:
    """The informative line of a torch/pickle error (torch wraps it in advice and a docs link)."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Check the documentation of torch.load")]
    return lines[0] if lines else type(error).__name__


# torch names a refused global in one of two ways: a GLOBAL opcode outside the allowlist, or
# (for an object that an allowed callable returned) the class it would have to BUILD.
_UNSAFE_GLOBAL_RE = re.compile(
    r"GLOBAL (\S+) (?:was not an allowed global|whose module)|"
    r"types allowlisted via `add_safe_globals`, but got <class '([^']+)'>"
)


def _classify_load_error(path: str, data: bytes, error: BaseException) -> Optional[CheckpointLoadError]:
    """Turn an error raised while torch reads ``data`` into ours; None if it is not such an error."""
    if isinstance(error, pickle.UnpicklingError):
        named = {a or b for a, b in _UNSAFE_GLOBAL_RE.findall(str(error))}
        if named:
            return CheckpointLoadError(_unsafe_message(path, sorted(named), None))
        return CheckpointLoadError(
            f"checkpoint {path} was not loaded: torch's weights-only unpickler cannot read it "
            f"({_torch_reason(error)}); it was not written by fairseq's torch.save, re-create "
            "it with fairseq-train"
        )
    if isinstance(error, EOFError):
        return CheckpointLoadError(corrupt_file_message(path, len(data), "its pickle data ends early"))
    if isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error):
        return CheckpointLoadError(corrupt_file_message(path, len(data), f"torch cannot read the archive ({error})"))
    return None


# --------------------------------------------------------------------------------------------
# The checked load.
# --------------------------------------------------------------------------------------------
_TORCH_TRUE_VALUES = ("1", "y", "yes", "true")  # how torch reads its TORCH_FORCE_* variables
_warned_weights_only_off = False


def _warn_if_weights_only_disabled() -> None:
    """Once per process, say what TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD changes: torch then unpickles without
    restriction in every ``torch.load`` call that does not pass ``weights_only``; :func:`read_checkpoint`
    passes ``weights_only=True``, so it is unaffected."""
    global _warned_weights_only_off
    if _warned_weights_only_off:
        return
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in _TORCH_TRUE_VALUES:
        _warned_weights_only_off = True
        logger.warning(
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: fairseq_accel's own loads of local checkpoint files "
            "stay weights-only, but every torch.load outside them that does not pass weights_only (other "
            "tools, fairseq without the plugin, fairseq reading a remote-store path) can now run code "
            "hidden in a checkpoint. Unset it: fairseq_accel loads fairseq checkpoints without it"
        )


def _import_global(name: str) -> Any:
    """Resolve a pickle global such as ``pathlib.PosixPath`` to the object, importing its module."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    raise CheckpointLoadError(
        f"trusted checkpoint needs the global {name}, which cannot be imported in this process; "
        "load the plugin that defines it (--user-dir) and try again"
    )


def _allowed_extra(path: str, data: bytes) -> List[Tuple[Any, str]]:
    """The (object, name) pairs to allow beyond :data:`SAFE_GLOBALS` for this content: exactly the
    globals it was trusted for; raises the one-line refusal if it needs globals not trusted."""
    names = checkpoint_globals(path, data)
    if not names:
        return []
    trusted = trust_entry(hashlib.sha256(data).hexdigest())
    if trusted is None or not set(names) <= trusted.allowed:
        raise CheckpointLoadError(_unsafe_message(path, names, trusted))
    logger.warning("loading trusted checkpoint %s with globals outside the allowlist: %s", path, ", ".join(names))
    return [(_import_global(name), name) for name in sorted(trusted.allowed)]


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The raw state a torch file holds, loaded safely: read once, checked, unpickled from memory.

    Only :data:`SAFE_GLOBALS` and the globals the user trusted this exact content for are allowed,
    for this load only. Every failure is one :class:`CheckpointLoadError` line.
    """
    _warn_if_weights_only_disabled()
    data = read_checkpoint_bytes(path)
    allowed = [(entry.obj, entry.name) for entry in SAFE_GLOBALS] + _allowed_extra(path, data)
    try:
        with torch.serialization.safe_globals(allowed):
            # weights_only given explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off here
            return torch.load(io.BytesIO(data), map_location=torch.device("cpu"), weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        ours = _classify_load_error(path, data, error)
        if ours is None:
            raise
        raise ours from None  # torch's message advises weights_only=False; ours replaces it


@contextlib.contextmanager
def torch_load_through_checks() -> Iterator[None]:
    """For tools that call ``torch.load(path)`` on a fairseq checkpoint themselves (CTranslate2's
    converter): while active, ``torch.load`` of a file path goes through :func:`read_checkpoint`."""
    original = torch.load

    @functools.wraps(original)
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, (str, os.PathLike)):
            return read_checkpoint(os.fspath(f))
        return original(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# --------------------------------------------------------------------------------------------
# Registry check: the checkpoint's model and task must be registered by a loaded plugin.
# --------------------------------------------------------------------------------------------
def _field(obj: Any, key: str) -> Any:
    """``obj.key`` for a Namespace, ``obj[key]`` for a dict or DictConfig, else None."""
    if obj is None:
        return None
    if isinstance(obj, argparse.Namespace):
        return getattr(obj, key, None)
    getter = getattr(obj, "get", None)
    return getter(key) if callable(getter) else None


def checkpoint_names(state: Dict[str, Any]) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(model arch, task, --user-dir used in training) recorded in a raw checkpoint state."""
    args = state.get("args")
    if args is not None:  # checkpoints older than fairseq 0.10
        return getattr(args, "arch", None), getattr(args, "task", None), getattr(args, "user_dir", None)
    cfg = state.get("cfg")
    model, task = _field(cfg, "model"), _field(cfg, "task")
    arch = _field(model, "arch") or _field(model, "_name")
    task_name = task if isinstance(task, str) else _field(task, "_name")
    return arch, task_name, _field(_field(cfg, "common"), "user_dir")


def _our_user_dir() -> str:
    user_dir = Path(__file__).resolve().parents[2] / "user_dir"
    return str(user_dir) if user_dir.is_dir() else "<path to fairseq_accel checkout>/user_dir"


def check_registered(path: str, state: Dict[str, Any]) -> None:
    """Raise :class:`CheckpointLoadError` if the checkpoint's arch or task is not registered."""
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    arch, task, trained_user_dir = checkpoint_names(state)
    missing, close = [], []
    if arch and arch not in ARCH_MODEL_REGISTRY and arch not in MODEL_REGISTRY:
        missing.append(f"model architecture '{arch}'")
        close += difflib.get_close_matches(arch, list(ARCH_MODEL_REGISTRY), n=3, cutoff=0.8)
    if task and task not in TASK_REGISTRY:
        missing.append(f"task '{task}'")
        close += difflib.get_close_matches(task, list(TASK_REGISTRY), n=3, cutoff=0.8)
    if not missing:
        return
    origin = f"; it was trained with --user-dir {trained_user_dir}" if trained_user_dir else ""
    renamed = f"; registered names close to it: {', '.join(close)}" if close else ""
    raise CheckpointLoadError(
        f"checkpoint {path} uses {' and '.join(missing)}, which is not registered with fairseq in "
        f"this process: the plugin that defines it is not loaded; pass --user-dir {_our_user_dir()} "
        f"if it is a fairseq_accel model, or the --user-dir of the plugin that defines it{origin}"
        f"{renamed}"
    )


# --------------------------------------------------------------------------------------------
# Wrappers around fairseq.checkpoint_utils.
# --------------------------------------------------------------------------------------------
_loading_path: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "fairseq_accel_loading_path", default=None
)
# the task of the fairseq-train run whose checkpoint is being restored (see _restore_task_state)
_restoring_task: contextvars.ContextVar[Optional[Any]] = contextvars.ContextVar("fairseq_accel_restoring_task", default=None)
_WRAPPED_MARK = "__fairseq_accel_wrapped__"

#: Turns the raw state of a compressed checkpoint into a fairseq one (set by fairseq_accel.compression when
#: the plugin is loaded; the startup hook alone cannot read compressed checkpoints).
_compressed_reader: Optional[Callable[[str, Dict[str, Any]], Dict[str, Any]]] = None


def set_compressed_reader(reader: Callable[[str, Dict[str, Any]], Dict[str, Any]]) -> None:
    global _compressed_reader
    _compressed_reader = reader


def _expand_compressed(path: str, state: Dict[str, Any]) -> Dict[str, Any]:
    if not isinstance(state, dict) or COMPRESSED_KEY not in state:
        return state
    if _compressed_reader is None:
        raise CheckpointLoadError(f"{path} is a compressed checkpoint (fairseq-accel-compress); load it with the "
                                  "plugin: --user-dir user_dir (or import fairseq_accel.plugin)")
    try:
        return _compressed_reader(path, state)
    except ValueError as error:  # the format's own one-line errors (version, malformed tensor)
        raise CheckpointLoadError(str(error)) from None


def _finish_like_fairseq(state: Dict[str, Any], arg_overrides: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What fairseq 0.12's ``load_checkpoint_to_cpu`` does after ``torch.load`` (omegaconf >= 2.2,
    which hydra-core 1.3 requires): apply overrides, make ``cfg`` a DictConfig, upgrade the state."""
    from omegaconf import OmegaConf

    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import overwrite_args_by_name

    if state.get("args") is not None and arg_overrides is not None:
        for arg_name, arg_val in arg_overrides.items():
            setattr(state["args"], arg_name, arg_val)
    if state.get("cfg") is not None:
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
        if arg_overrides is not None:
            overwrite_args_by_name(state["cfg"], arg_overrides)
    return checkpoint_utils._upgrade_state_dict(state)


def _wrap_load_checkpoint_to_cpu(original: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_checkpoint_to_cpu(*args: Any, **kwargs: Any) -> Dict[str, Any]:
        bound = signature.bind(*args, **kwargs)
        path = str(bound.arguments["path"])
        if not _is_local(path):  # remote store: fairseq fetches and loads it; the allowlist still applies
            _warn_if_weights_only_disabled()  # fairseq's torch.load there does not pass weights_only
            with torch.serialization.safe_globals([(entry.obj, entry.name) for entry in SAFE_GLOBALS]):
                return original(*args, **kwargs)
        token = _loading_path.set(path)  # for the registry check inside _upgrade_state_dict
        try:
            state = _finish_like_fairseq(_expand_compressed(path, read_checkpoint(path)),
                                         bound.arguments.get("arg_overrides"))
        finally:
            _loading_path.reset(token)
        _restore_task_state(state)
        return state

    return load_checkpoint_to_cpu


def _wrap_upgrade_state_dict(original: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    # fairseq's _upgrade_state_dict is the first code that looks the arch up in the registries
    # (legacy args checkpoints); checking here catches both old and new checkpoints before that.
    @functools.wraps(original)
    def _upgrade_state_dict(state: Dict[str, Any], *args: Any, **kwargs: Any) -> Dict[str, Any]:
        check_registered(_loading_path.get() or "<in memory>", state)
        return original(state, *args, **kwargs)

    return _upgrade_state_dict


_SIZE_MISMATCH_RE = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
)
_DICTIONARY_SIZED = ("embed_tokens", "output_projection", "embed_out", "ctc_proj")


def size_mismatch_message(paths: Sequence[str], error: RuntimeError) -> Optional[str]:
    """One line for torch's "size mismatch" ``load_state_dict`` error (first parameter), else None."""
    match = _SIZE_MISMATCH_RE.search(str(error))
    if match is None:
        return None
    name, saved, current = match.groups()
    if any(part in name for part in _DICTIONARY_SIZED):
        cause = (
            f"the dictionary used now has {current.split(',')[0]} entries and the checkpoint's had "
            f"{saved.split(',')[0]}: use the dictionaries (dict.*.txt) of the data the model was trained on"
        )
    else:
        cause = "the model options given now differ from those the checkpoint was trained with"
    return (
        f"checkpoint {', '.join(paths)} does not fit the model: parameter {name} has shape [{saved}] in the "
        f"checkpoint but [{current}] in the model built now; likely cause: {cause}"
    )


def _wrap_load_model_ensemble_and_task(original: Callable[..., Any]) -> Callable[..., Any]:
    # fairseq checks that each file exists before calling load_checkpoint_to_cpu and raises a
    # bare "Model file not found"; check first so that the message lists what the folder holds.
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_model_ensemble_and_task(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        params = bound.arguments
        paths = [str(filename) for filename in params["filenames"]]
        if params["state"] is None:
            from fairseq import checkpoint_utils

            for filename in params["filenames"]:
                for shard in range(params["num_shards"]):
                    path = checkpoint_utils.get_maybe_sharded_checkpoint_filename(
                        filename, params["suffix"], shard, params["num_shards"]
                    )
                    if _is_local(path) and not os.path.exists(path):
                        raise CheckpointNotFoundError(missing_file_message(path))
        try:
            return original(*args, **kwargs)
        except RuntimeError as error:
            message = size_mismatch_message(paths, error)
            if message is None:
                raise
            raise CheckpointLoadError(message) from None

    return load_model_ensemble_and_task


def _restore_task_state(state: Dict[str, Any]) -> None:
    """Give the checkpoint's task state to the task that ``fairseq-train --restore-file`` resumes.

    fairseq's generation path calls ``task.load_state_dict`` before building the model, but
    ``Trainer.load_checkpoint`` never does, so what a task checks there (the accel tasks compare
    their vocabularies with the checkpoint's) was skipped when training resumed.
    """
    task = _restoring_task.get()
    if task is not None and "task_state" in state:
        task.load_state_dict(state["task_state"])


def _wrap_load_checkpoint(original: Callable[..., Any]) -> Callable[..., Any]:
    # fairseq-train treats a --restore-file that does not exist as "no checkpoint yet" and trains
    # from scratch. Only the default value (checkpoint_last.pt under --save-dir) may be absent.
    @functools.wraps(original)
    def load_checkpoint(cfg: Any, trainer: Any, **passthrough_args: Any) -> Any:
        restore_file = cfg.restore_file
        if restore_file != "checkpoint_last.pt":  # how fairseq itself tells the default apart
            suffix = trainer.checkpoint_suffix
            path = restore_file.replace(".pt", suffix + ".pt") if suffix is not None else restore_file
            if _is_local(path) and not os.path.isfile(path):
                what = "is a folder" if os.path.isdir(path) else "does not exist"
                raise CheckpointNotFoundError(
                    f"--restore-file {path} {what}; {folder_listing(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))}; "
                    "pass an existing checkpoint file, or leave --restore-file out to resume from "
                    "<save-dir>/checkpoint_last.pt when there is one"
                )
        token = _restoring_task.set(trainer.task)
        try:
            return original(cfg, trainer, **passthrough_args)
        finally:
            _restoring_task.reset(token)

    return load_checkpoint


_WRAPPERS: Dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "load_checkpoint_to_cpu": _wrap_load_checkpoint_to_cpu,
    "load_model_ensemble_and_task": _wrap_load_model_ensemble_and_task,
    "_upgrade_state_dict": _wrap_upgrade_state_dict,
    "load_checkpoint": _wrap_load_checkpoint,
}


def install() -> None:
    """Wrap fairseq's checkpoint loaders (the allowlist applies per load); safe to call more than once."""
    checkpoint_utils = importlib.import_module("fairseq.checkpoint_utils")
    for name, wrap in _WRAPPERS.items():
        current = getattr(checkpoint_utils, name)
        if getattr(current, _WRAPPED_MARK, False):
            continue
        wrapper = wrap(current)
        setattr(wrapper, _WRAPPED_MARK, True)
        setattr(checkpoint_utils, name, wrapper)



__all__ = [
    "check_registered",
    "checkpoint_names",
    "install",
    "read_checkpoint",
    "set_compressed_reader",
    "size_mismatch_message",
    "torch_load_through_checks",
]
