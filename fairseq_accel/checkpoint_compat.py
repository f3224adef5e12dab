"""Load fairseq 0.12 checkpoints under torch >= 2.6 safely, and explain in one line why a load fails.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: it unpickles tensors and plain
containers only and refuses every other pickled global. fairseq 0.12 checkpoints hold a few such
globals, so stock ``fairseq-generate``, ``fairseq-interactive`` and ``fairseq-train --restore-file``
die with ``UnpicklingError``. Importing this module (``fairseq_accel`` imports it, ``--user-dir
user_dir`` imports ``fairseq_accel`` before fairseq loads any checkpoint) fixes that without
turning safety off:

* ``SAFE_GLOBALS`` is added to torch's weights-only allowlist: exactly what torch refused when
  loading checkpoints written by fairseq 0.12.3 + torch 2.13 (stock ``transformer``; cross entropy
  and label smoothing; fixed, inverse_sqrt, cosine and reduce_lr_on_plateau schedules; adam and
  nag; EMA; ``--eval-bleu``), found with ``torch.serialization.get_unsafe_globals_in_checkpoint``
  and by loading them (a pickled numpy dtype also needs its class, e.g. ``Int64DType``), plus the
  numpy scalar constructor, which fairseq tasks that log numpy floats (``audio_classification``)
  put into the saved meters. Every entry only builds a value; none can call arbitrary code.
  Training meters are saved as plain state dicts in 0.12 and omegaconf configs as plain
  containers (``OmegaConf.to_container``), so neither needs an entry.
* ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (every fairseq load path calls it through
  the module attribute: ``load_model_ensemble_and_task`` used by generate, interactive, validate
  and the hub, and ``Trainer.load_checkpoint`` used by ``--restore-file``/``--finetune-from-model``)
  ``load_model_ensemble_and_task`` and ``_upgrade_state_dict`` are wrapped so that a missing file,
  a truncated file, a global outside the allowlist, and a model architecture or task that no
  loaded plugin registered each raise one :class:`CheckpointLoadError` whose message names the
  problem and the fix.
* A file with other globals is loaded only after the user vouches for it:
  ``fairseq-accel-trust-checkpoint PATH`` (or :func:`trust_checkpoint` in Python) records the
  file's SHA-256; a later load of that exact content allows just the globals it needs, still
  through the weights-only unpickler (modules torch blocks, such as ``os``, stay refused).

Without ``--user-dir`` (a stock ``fairseq-generate`` run), nothing imports ``fairseq_accel``, and
torch would fail with ``UnpicklingError`` before any code of ours runs. So an installed plugin (pip
install, normal or ``-e``) also ships a startup hook: ``fairseq_accel_startup.pth`` imports the
stdlib-only ``fairseq_accel_startup`` at interpreter start, which waits until a process imports
``fairseq.checkpoint_utils`` and then executes this module alone (not the package, so no models
are registered and nothing heavy is imported in processes that never load fairseq). A stock
transformer checkpoint then loads with stock CLIs, and a checkpoint of one of our models fails
with the one-line "not registered ... pass --user-dir" error instead of torch's advice to set
``weights_only=False``. From a bare checkout (no pip install) only ``--user-dir`` applies this.
This module therefore imports nothing from the rest of the plugin, and installs itself once
however it is reached (``import fairseq_accel`` reuses the module the hook loaded).
"""
from __future__ import annotations

import argparse
import contextvars
import difflib
import functools
import hashlib
import importlib
import inspect
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be loaded; the message says why and how to fix it, in one line."""


class SafeGlobal(NamedTuple):
    """One allowlisted pickle global: the dotted name a checkpoint refers to, the object, and why."""

    name: str
    obj: Callable[..., Any]
    reason: str


def _numpy_multiarray() -> Any:
    """numpy's ``multiarray`` module (``numpy._core`` since numpy 2, ``numpy.core`` before)."""
    core = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
    return importlib.import_module(f"{core}.multiarray")


def _build_safe_globals() -> Tuple[SafeGlobal, ...]:
    multiarray = _numpy_multiarray()
    entries = [
        SafeGlobal(
            "argparse.Namespace",
            argparse.Namespace,
            "cfg['model'] of every model configured through add_args (e.g. `transformer`), and "
            "state['args'] of checkpoints older than fairseq 0.10; it only stores attributes",
        ),
        SafeGlobal(
            "numpy.ndarray",
            np.ndarray,
            "numpy arrays in the saved meters: translation --eval-bleu logs _bleu_counts and "
            "_bleu_totals as arrays; argument of _reconstruct, builds an empty array",
        ),
        SafeGlobal("numpy.dtype", np.dtype, "dtype of a pickled numpy array or scalar; builds a dtype"),
    ]
    # Unpickling a dtype builds an instance of its concrete class (numpy.dtypes.Int64DType, ...),
    # which torch only allows if that class is listed too. Numeric and bool dtypes only: what
    # metrics use. Object, string and datetime arrays are not needed and stay refused.
    dtype_classes = {type(np.dtype(code)): np.dtype(code).name for code in "?bhilqBHILQefdgFDG"}
    for dtype_class, dtype_name in dtype_classes.items():
        entries.append(
            SafeGlobal(
                f"{dtype_class.__module__}.{dtype_class.__qualname__}",
                dtype_class,
                f"class of the numpy dtype {dtype_name}, instantiated when such a dtype "
                "is unpickled (--eval-bleu meters hold int64 arrays)",
            )
        )
    # A pickle names the module numpy had when it was written: numpy 1.x wrote numpy.core.*,
    # numpy 2.x writes numpy._core.*. Both names map to this numpy's function.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries.append(
            SafeGlobal(
                f"{module}._reconstruct",
                multiarray._reconstruct,
                "how numpy pickles an ndarray (--eval-bleu meters); allocates an empty array whose "
                "contents are then unpickled under the same weights-only rules",
            )
        )
        entries.append(
            SafeGlobal(
                f"{module}.scalar",
                multiarray.scalar,
                "how numpy pickles a numpy scalar (e.g. an np.float64 metric logged by a fairseq "
                "task such as audio_classification, or a `best` score); builds a number from bytes",
            )
        )
    return tuple(entries)


#: The weights-only allowlist this plugin adds, with the reason for each entry.
SAFE_GLOBALS: Tuple[SafeGlobal, ...] = _build_safe_globals()

_TORCH_BLOCKED_MODULES = ("os", "sys", "posix", "nt")  # torch refuses these even when allowlisted
# torch names a refused global in one of two ways: a GLOBAL opcode outside the allowlist, or
# (for an object that an allowed callable returned) the class it would have to BUILD.
_UNSAFE_GLOBAL_RE = re.compile(
    r"GLOBAL (\S+) (?:was not an allowed global|whose module)|"
    r"types allowlisted via `add_safe_globals`, but got <class '([^']+)'>"
)
_WRAPPED_MARK = "__fairseq_accel_wrapped__"
_loading_path: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "fairseq_accel_loading_path", default=None
)


def register_safe_globals() -> None:
    """Add :data:`SAFE_GLOBALS` to torch's weights-only allowlist (idempotent: it is a set)."""
    torch.serialization.add_safe_globals([(entry.obj, entry.name) for entry in SAFE_GLOBALS])


# --------------------------------------------------------------------------------------------
# Opt-in for files with other globals: trust by content hash.
# --------------------------------------------------------------------------------------------
_trusted_in_process: Set[str] = set()


def trust_store_path() -> Path:
    """Per-user file of trusted checkpoint hashes (``$XDG_CONFIG_HOME`` or ``~/.config``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "fairseq_accel" / "trusted_checkpoints.tsv"


def file_sha256(path: str) -> str:
    """SHA-256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _persisted_trust() -> Dict[str, str]:
    """sha256 -> path at the time of trusting, from the per-user trust store."""
    store = trust_store_path()
    if not store.is_file():
        return {}
    trusted = {}
    for line in store.read_text(encoding="utf-8").splitlines():
        digest, _, path = line.partition("\t")
        if digest:
            trusted[digest] = path
    return trusted


def trust_checkpoint(path: str, persist: bool = False) -> str:
    """Allow this exact file (by SHA-256) to unpickle the globals it needs; return its hash.

    The trust covers this process, or with ``persist=True`` every later process of this user.
    Editing or replacing the file voids it. Modules torch blocks (``os``, ``sys``) stay refused.
    """
    digest = file_sha256(path)
    _trusted_in_process.add(digest)
    if persist and digest not in _persisted_trust():
        store = trust_store_path()
        store.parent.mkdir(parents=True, exist_ok=True)
        with open(store, "a", encoding="utf-8") as f:
            f.write(f"{digest}\t{os.path.abspath(path)}\n")
    return digest


def is_trusted(path: str) -> bool:
    """True if the user trusted this file's current content (hashes only when some trust exists)."""
    persisted = _persisted_trust()
    if not _trusted_in_process and not persisted:
        return False
    digest = file_sha256(path)
    return digest in _trusted_in_process or digest in persisted


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


# --------------------------------------------------------------------------------------------
# Diagnosis of a bad file.
# --------------------------------------------------------------------------------------------
def _is_local(path: str) -> bool:
    """False for paths fairseq resolves through PathManager (remote stores); those are not checked."""
    from fairseq.file_io import PathManager

    return not PathManager.path_requires_pathmanager(path)


def _listing(folder: str) -> str:
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    names = sorted(n for n in os.listdir(folder) if n.endswith(".pt"))
    if not names:
        return f"{folder} holds no *.pt checkpoint files"
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return f"{folder} holds: {shown}"


def _missing_message(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    return (
        f"checkpoint file not found: {path}; {_listing(folder)}; pass the path of an existing "
        "checkpoint (e.g. --path <save-dir>/checkpoint_best.pt)"
    )


def _corrupt_message(path: str, detail: str = "the file is not a complete torch zip archive") -> str:
    size = os.path.getsize(path)
    return (
        f"checkpoint {path} ({size} bytes) is truncated or corrupt: {detail}; re-copy or re-train it"
    )


_LEGACY_TORCH_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def check_checkpoint_file(path: str) -> None:
    """Raise :class:`CheckpointLoadError` if ``path`` is missing, a folder or not a whole torch file.

    A torch file is a zip archive whose central directory sits at the very end (a partial copy
    loses it), or the pre-1.6 format that starts with torch's pickled magic number.
    """
    if not os.path.exists(path):
        raise CheckpointLoadError(_missing_message(path))
    if os.path.isdir(path):
        raise CheckpointLoadError(
            f"checkpoint path {path} is a folder, not a checkpoint file; {_listing(path)}; "
            "pass the path of one checkpoint file"
        )
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    if head != _LEGACY_TORCH_MAGIC:
        raise CheckpointLoadError(_corrupt_message(path))


def unsafe_globals_in(path: str, error: Optional[BaseException] = None) -> List[str]:
    """Globals of the file outside the allowlist: all of them for a zip file, plus any named in ``error``."""
    names = {a or b for a, b in _UNSAFE_GLOBAL_RE.findall(str(error))} if error is not None else set()
    if zipfile.is_zipfile(path):
        try:
            names.update(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # the static scan is best effort; the error already names one global
            pass
    return sorted(names)


def _unsafe_message(path: str, names: Sequence[str]) -> str:
    blocked = [n for n in names if n.split(".")[0] in _TORCH_BLOCKED_MODULES]
    if blocked:
        return (
            f"checkpoint {path} was not loaded: it references {', '.join(blocked)}, which torch never "
            "unpickles (a checkpoint has no business calling into os/sys); do not use this file, "
            "re-create it with fairseq-train"
        )
    return (
        f"checkpoint {path} was not loaded: it contains pickled {', '.join(names)}, which is not on "
        "fairseq_accel's weights-only allowlist (unpickling an unknown global can run arbitrary code); "
        f"if you trust this file, run `fairseq-accel-trust-checkpoint {path}` (or call "
        "fairseq_accel.checkpoint_compat.trust_checkpoint(path) in Python) and load it again"
    )


def _torch_reason(error: BaseException) -> str:
    """The informative line of a torch/pickle error (torch wraps it in advice and a docs link)."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Check the documentation of torch.load")]
    return lines[0] if lines else type(error).__name__


def _classify_load_error(path: str, error: BaseException) -> Optional[CheckpointLoadError]:
    """Turn an error raised while torch reads the file into ours; None if it is not such an error."""
    if isinstance(error, pickle.UnpicklingError):
        names = unsafe_globals_in(path, error)
        if names:
            return CheckpointLoadError(_unsafe_message(path, names))
        if "Weights only load failed" in str(error):
            return CheckpointLoadError(
                f"checkpoint {path} was not loaded: torch's weights-only unpickler cannot read it "
                f"({_torch_reason(error)}); it was not written by fairseq's torch.save, re-create "
                "it with fairseq-train"
            )
        detail = f"its pickle data is damaged ({_torch_reason(error)})"
        return CheckpointLoadError(_corrupt_message(path, detail))
    if isinstance(error, EOFError):
        return CheckpointLoadError(_corrupt_message(path, "its pickle data ends early"))
    if isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error):
        return CheckpointLoadError(_corrupt_message(path, f"torch cannot read the archive ({error})"))
    return None


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
    user_dir = Path(__file__).resolve().parent.parent / "user_dir"
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
def _wrap_load_checkpoint_to_cpu(original: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_checkpoint_to_cpu(*args: Any, **kwargs: Any) -> Dict[str, Any]:
        path = str(signature.bind(*args, **kwargs).arguments["path"])
        local = _is_local(path)
        if local:
            check_checkpoint_file(path)
        token = _loading_path.set(path)  # for the registry check inside _upgrade_state_dict
        try:
            return _load_or_explain(original, path, local, args, kwargs)
        finally:
            _loading_path.reset(token)

    return load_checkpoint_to_cpu


def _load_or_explain(
    original: Callable[..., Dict[str, Any]],
    path: str,
    local: bool,
    args: Sequence[Any],
    kwargs: Dict[str, Any],
) -> Dict[str, Any]:
    """fairseq's load; an unpickling or archive error becomes our one-line error, unless the
    error is an unlisted global in a file the user trusted, which is then loaded."""
    try:
        return original(*args, **kwargs)
    except CheckpointLoadError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        ours = _classify_load_error(path, error) if local else None
        if ours is None:
            raise
        if not (isinstance(error, pickle.UnpicklingError) and is_trusted(path)):
            raise ours from None  # torch's message advises weights_only=False; ours replaces it
    return _load_trusted(original, path, args, kwargs)


def _load_trusted(
    original: Callable[..., Dict[str, Any]], path: str, args: Sequence[Any], kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    """Load a user-trusted file, allowing exactly the globals it needs, still weights-only."""
    allowed: List[Tuple[Any, str]] = []
    for _ in range(64):  # a legacy (non-zip) file reveals one global per attempt
        try:
            with torch.serialization.safe_globals(allowed):
                return original(*args, **kwargs)
        except pickle.UnpicklingError as error:
            already = {name for _, name in allowed}
            names = [n for n in unsafe_globals_in(path, error) if n not in already]
            if not names or any(n.split(".")[0] in _TORCH_BLOCKED_MODULES for n in names):
                raise (_classify_load_error(path, error) or error) from None
            allowed += [(_import_global(name), name) for name in names]
            logger.warning(
                "loading trusted checkpoint %s with globals outside the allowlist: %s",
                path, ", ".join(name for _, name in allowed),
            )
    raise CheckpointLoadError(f"checkpoint {path} needs more than 64 distinct globals; refusing to load it")


def _wrap_upgrade_state_dict(original: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    # fairseq's _upgrade_state_dict is the first code that looks the arch up in the registries
    # (legacy args checkpoints); checking here catches both old and new checkpoints before that.
    @functools.wraps(original)
    def _upgrade_state_dict(state: Dict[str, Any], *args: Any, **kwargs: Any) -> Dict[str, Any]:
        check_registered(_loading_path.get() or "<in memory>", state)
        return original(state, *args, **kwargs)

    return _upgrade_state_dict


def _wrap_load_model_ensemble_and_task(original: Callable[..., Any]) -> Callable[..., Any]:
    # fairseq checks that each file exists before calling load_checkpoint_to_cpu and raises a
    # bare "Model file not found"; check first so that the message lists what the folder holds.
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_model_ensemble_and_task(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        params = bound.arguments
        if params["state"] is None:
            from fairseq import checkpoint_utils

            for filename in params["filenames"]:
                for shard in range(params["num_shards"]):
                    path = checkpoint_utils.get_maybe_sharded_checkpoint_filename(
                        filename, params["suffix"], shard, params["num_shards"]
                    )
                    if _is_local(path) and not os.path.exists(path):
                        raise CheckpointLoadError(_missing_message(path))
        return original(*args, **kwargs)

    return load_model_ensemble_and_task


_WRAPPERS: Dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "load_checkpoint_to_cpu": _wrap_load_checkpoint_to_cpu,
    "load_model_ensemble_and_task": _wrap_load_model_ensemble_and_task,
    "_upgrade_state_dict": _wrap_upgrade_state_dict,
}


def install() -> None:
    """Register the allowlist and wrap fairseq's checkpoint loaders; safe to call more than once."""
    register_safe_globals()
    checkpoint_utils = importlib.import_module("fairseq.checkpoint_utils")
    for name, wrap in _WRAPPERS.items():
        current = getattr(checkpoint_utils, name)
        if getattr(current, _WRAPPED_MARK, False):
            continue
        wrapper = wrap(current)
        setattr(wrapper, _WRAPPED_MARK, True)
        setattr(checkpoint_utils, name, wrapper)


# --------------------------------------------------------------------------------------------
# Command line: fairseq-accel-trust-checkpoint
# --------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Record checkpoints the user trusts, so that fairseq CLIs load their extra globals."""
    parser = argparse.ArgumentParser(
        prog="fairseq-accel-trust-checkpoint",
        description="Trust checkpoint files (by SHA-256) whose pickled objects are outside "
        "fairseq_accel's weights-only allowlist. Only do this for files from a source you trust.",
    )
    parser.add_argument("paths", nargs="*", help="checkpoint files to trust")
    parser.add_argument("--list", action="store_true", help="print the trusted files and exit")
    options = parser.parse_args(argv)
    if options.list or not options.paths:
        print(f"# {trust_store_path()}")
        for digest, path in _persisted_trust().items():
            print(f"{digest}\t{path}")
        return 0
    for path in options.paths:
        check_checkpoint_file(path)
        needed = unsafe_globals_in(path)
        digest = trust_checkpoint(path, persist=True)
        print(f"trusted {path} (sha256 {digest}); extra globals: {', '.join(needed) or 'none'}")
    return 0


__all__ = [
    "CheckpointLoadError",
    "SAFE_GLOBALS",
    "SafeGlobal",
    "check_checkpoint_file",
    "check_registered",
    "checkpoint_names",
    "install",
    "main",
    "register_safe_globals",
    "trust_checkpoint",
    "unsafe_globals_in",
]

install()
