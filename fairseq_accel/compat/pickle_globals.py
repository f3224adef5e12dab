"""The pickle globals of a fairseq checkpoint: which are allowed, what each can do, and which a file holds.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: it unpickles tensors and plain
containers only and refuses every other pickled global. fairseq 0.12 checkpoints hold a few such
globals. This module says which globals the plugin's loads allow and why, without loading anything:

* :data:`SAFE_GLOBALS` is the weights-only allowlist of every fairseq checkpoint load: exactly what
  torch refused when loading checkpoints written by fairseq 0.12.3 + torch 2.13 (stock
  ``transformer``; cross entropy and label smoothing; fixed, inverse_sqrt, cosine and
  reduce_lr_on_plateau schedules; adam and nag; EMA; ``--eval-bleu``), plus the numpy scalar
  constructor that tasks logging numpy floats put into the saved meters. Every entry only builds a
  value; none can call arbitrary code. It is applied per load, never added to torch's global list.
* :func:`classify_global` judges any other global: a known value-building class (e.g.
  ``pathlib.PurePosixPath``) may be trusted plainly; anything that can execute code or touch the
  system (``subprocess``, ``builtins.exec``, ``cProfile.run``, ``functools.partial``, ...) or that
  the plugin does not know may be trusted only with ``--allow-code-execution``.
* :func:`pickled_globals` lists the globals a torch file's pickle names by reading its opcodes,
  without unpickling anything, so a file can be judged before it is loaded.

Loaded by path by the startup hook (``fairseq_accel_startup``): imports nothing from the plugin.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import enum
import importlib
import io
import pickletools
import zipfile
from typing import Any, Callable, Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np
import torch


# --------------------------------------------------------------------------------------------
# The weights-only allowlist.
# --------------------------------------------------------------------------------------------
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


#: The weights-only allowlist of every fairseq checkpoint load, with the reason for each entry.
SAFE_GLOBALS: Tuple[SafeGlobal, ...] = _build_safe_globals()


# --------------------------------------------------------------------------------------------
# Classification of the globals a checkpoint pickles.
# --------------------------------------------------------------------------------------------
class GlobalKind(enum.Enum):
    """What unpickling (calling) a global can do."""

    ALLOWED = "on the allowlist"
    BUILDS_VALUE = "only builds a value"
    EXECUTES_CODE = "can execute code or touch the system"
    UNKNOWN = "unknown to fairseq_accel; unpickling it may run code"


#: Globals outside the allowlist known to only build a value (no file, process or code access);
#: a user may trust a file holding them without --allow-code-execution.
VALUE_BUILDERS: FrozenSet[str] = frozenset(
    [f"pathlib.{name}" for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath",
                                    "PureWindowsPath")]
    + [f"datetime.{name}" for name in ("date", "time", "datetime", "timedelta", "timezone")]
    + [f"builtins.{name}" for name in ("set", "frozenset", "complex", "slice", "range", "bytearray",
                                       "bytes", "str", "int", "float", "bool", "tuple", "list", "dict")]
    + ["collections.Counter", "collections.deque", "decimal.Decimal", "fractions.Fraction", "uuid.UUID",
       "typing.Any", "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
       "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode",
       "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode",
       "omegaconf.nodes.BooleanNode"]
)

#: Modules (and their submodules) whose functions and classes can execute code or touch the system,
#: with what they can do.
CODE_EXECUTING_MODULES: Dict[str, str] = {
    **dict.fromkeys(("subprocess", "pty", "os", "posix", "nt", "sys", "signal", "multiprocessing",
                     "threading", "_thread", "concurrent", "asyncio", "_posixsubprocess"),
                    "runs programs or controls processes"),
    **dict.fromkeys(("builtins.exec", "builtins.eval", "builtins.compile", "builtins.__import__",
                     "builtins.getattr", "builtins.setattr", "builtins.delattr", "builtins.globals",
                     "builtins.vars", "builtins.breakpoint", "builtins.input", "__builtin__", "code",
                     "codeop", "runpy", "importlib", "imp", "pkgutil", "cProfile", "profile", "trace",
                     "timeit", "pdb", "bdb", "types", "ctypes", "_ctypes", "cffi", "functools",
                     "operator", "copyreg", "copy_reg", "inspect", "torch.hub", "torch.jit",
                     "torch.package", "torch.utils.cpp_extension"),
                    "executes Python code or calls arbitrary functions"),
    **dict.fromkeys(("pickle", "_pickle", "cPickle", "marshal", "dill", "cloudpickle", "joblib", "shelve",
                     "torch.load", "torch.serialization", "numpy.load", "yaml"),
                    "unpickles further data, which can run code"),
    **dict.fromkeys(("builtins.open", "io", "_io", "shutil", "tempfile", "glob", "fileinput", "dbm",
                     "sqlite3", "numpy.fromfile", "numpy.memmap"),
                    "reads or writes files"),
    **dict.fromkeys(("socket", "ssl", "http", "urllib", "ftplib", "smtplib", "telnetlib", "webbrowser",
                     "requests"),
                    "opens network connections or programs"),
}
_TORCH_BLOCKED_MODULES = ("os", "sys", "posix", "nt")  # torch refuses these even when allowlisted


def torch_blocked(names: Sequence[str]) -> List[str]:
    """The globals among ``names`` that torch never unpickles, allowlisted or not (os/sys calls)."""
    return [name for name in names if name.split(".")[0] in _TORCH_BLOCKED_MODULES]


def _allowed_names() -> Set[str]:
    """Globals any fairseq checkpoint load allows: torch's defaults and :data:`SAFE_GLOBALS`."""
    defaults = torch.serialization._weights_only_unpickler._get_allowed_globals()
    return set(defaults) | {entry.name for entry in SAFE_GLOBALS}


def code_execution_reason(name: str) -> Optional[str]:
    """What the global ``name`` can do if it is in :data:`CODE_EXECUTING_MODULES`, else None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        reason = CODE_EXECUTING_MODULES.get(".".join(parts[:end]))
        if reason is not None:
            return reason
    return None


def classify_global(name: str) -> GlobalKind:
    """How trusting ``name`` (a pickle global such as ``subprocess.call``) would be judged."""
    if name in _allowed_names():
        return GlobalKind.ALLOWED
    if code_execution_reason(name) is not None:
        return GlobalKind.EXECUTES_CODE
    return GlobalKind.BUILDS_VALUE if name in VALUE_BUILDERS else GlobalKind.UNKNOWN


def needs_code_execution(names: Sequence[str]) -> List[str]:
    """The globals among ``names`` that may execute code (known to, or not known not to)."""
    return [n for n in names if classify_global(n) in (GlobalKind.EXECUTES_CODE, GlobalKind.UNKNOWN)]


def describe_global(name: str) -> str:
    """``name`` with what it can do, e.g. ``subprocess.call (runs programs or controls processes)``."""
    reason = code_execution_reason(name)
    return f"{name} ({reason})" if reason else f"{name} ({classify_global(name).value})"


# --------------------------------------------------------------------------------------------
# The globals a torch file's pickle names, found statically (nothing is unpickled).
# --------------------------------------------------------------------------------------------
_LEGACY_HEADER_PICKLES = 5  # magic number, protocol version, sys info, the object, storage keys
_UNRESOLVED_GLOBAL = "<a STACK_GLOBAL whose name is computed>"


class DamagedPickle(ValueError):
    """The pickle stream is not well formed (zeroed, overwritten or cut bytes)."""


def _pickle_record(data: bytes) -> Tuple[bytes, int]:
    """The pickle stream of a torch file and how many pickles it holds (zip: data.pkl; legacy: 5)."""
    if not data.startswith(b"PK"):
        return data, _LEGACY_HEADER_PICKLES
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(names) != 1:
            raise DamagedPickle(f"the archive holds {len(names)} data.pkl records, not 1")
        return archive.read(names[0]), 1


def _python3_name(module: str, name: str) -> str:
    """The Python 3 name of a global a protocol-2 pickle names (``__builtin__.exec`` is
    ``builtins.exec``, ``commands.call`` is ``subprocess.call``), mapped as torch's unpickler does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def pickled_globals(data: bytes) -> Set[str]:
    """Every global the pickle of a torch file (its bytes) names, without unpickling anything.

    Raises :class:`DamagedPickle` if the stream is not well formed or a zip member fails its CRC.
    """
    try:
        stream, count = _pickle_record(data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as error:  # bad CRC, bad header
        raise DamagedPickle(str(error)) from None
    found: Set[str] = set()
    reader = io.BytesIO(stream)
    try:
        for _ in range(count):
            strings: List[str] = []
            protocol = 0
            for opcode, arg, _ in pickletools.genops(reader):
                if opcode.name == "PROTO":
                    protocol = arg
                elif opcode.name == "GLOBAL":
                    found.add(_python3_name(*arg.split(" ", 1)) if protocol < 3 else arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    found.add(".".join(strings[-2:]) if len(strings) >= 2 else _UNRESOLVED_GLOBAL)
                if isinstance(arg, str) and "UNICODE" in opcode.name:
                    strings.append(arg)
                elif opcode.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                    strings.clear()
    except ValueError as error:  # pickletools' word for an unknown opcode or a cut stream
        raise DamagedPickle(str(error)) from None
    return found


def extra_globals(data: bytes) -> List[str]:
    """The file's globals outside the allowlist, sorted (:func:`pickled_globals` minus the allowed)."""
    return sorted(pickled_globals(data) - _allowed_names())


__all__ = [
    "CODE_EXECUTING_MODULES",
    "DamagedPickle",
    "GlobalKind",
    "SAFE_GLOBALS",
    "SafeGlobal",
    "VALUE_BUILDERS",
    "classify_global",
    "code_execution_reason",
    "describe_global",
    "extra_globals",
    "needs_code_execution",
    "pickled_globals",
    "torch_blocked",
]
