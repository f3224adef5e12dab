"""A checkpoint file as a file: the one-line load errors, and the checks made before anything is unpickled.

Every checkpoint problem the plugin reports is one :class:`CheckpointLoadError` whose message names
the problem and the fix; a path that is missing or a folder is a :class:`CheckpointNotFoundError`,
which ``except FileNotFoundError`` also catches, so code outside fairseq checkpoint loading that
handles a missing file keeps working. A file is read once, whole, into memory
(:func:`read_checkpoint_bytes`): what is checked, hashed and unpickled are the same bytes.

Loaded by path by the startup hook (``fairseq_accel_startup``): imports nothing from the plugin.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import List

import torch

from fairseq_accel.compat.pickle_globals import DamagedPickle, extra_globals

_LEGACY_TORCH_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


#: Top-level key of a compressed checkpoint (fairseq_accel.compression.compressed_format), which holds the
#: packed weights in place of ``model``.
COMPRESSED_KEY = "fairseq_accel_compressed"


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be loaded; the message says why and how to fix it, in one line."""


class CheckpointNotFoundError(CheckpointLoadError, FileNotFoundError):
    """The checkpoint path does not exist or is a folder (also a ``FileNotFoundError``)."""


def folder_listing(folder: str) -> str:
    """What a folder holds, for a message: its ``*.pt`` files (at most 12 named), or that it has none."""
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    names = sorted(n for n in os.listdir(folder) if n.endswith(".pt"))
    if not names:
        return f"{folder} holds no *.pt checkpoint files"
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return f"{folder} holds: {shown}"


def missing_file_message(path: str) -> str:
    """The one line for a checkpoint path that does not exist, with what its folder holds."""
    folder = os.path.dirname(os.path.abspath(path))
    return (
        f"checkpoint file not found: {path}; {folder_listing(folder)}; pass the path of an existing "
        "checkpoint (e.g. --path <save-dir>/checkpoint_best.pt)"
    )


def corrupt_file_message(path: str, size: int, detail: str = "the file is not a complete torch zip archive") -> str:
    """The one line for a checkpoint of ``size`` bytes that cannot be read, ``detail`` saying why."""
    return f"checkpoint {path} ({size} bytes) is truncated or corrupt: {detail}; re-copy or re-train it"


def check_checkpoint_file(path: str) -> None:
    """Raise :class:`CheckpointNotFoundError` if ``path`` is missing or a folder."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(missing_file_message(path))
    if os.path.isdir(path):
        raise CheckpointNotFoundError(
            f"checkpoint path {path} is a folder, not a checkpoint file; {folder_listing(path)}; "
            "pass the path of one checkpoint file"
        )


def read_checkpoint_bytes(path: str) -> bytes:
    """The whole file, after checking that it is one (missing or folder: one-line error)."""
    check_checkpoint_file(path)
    return Path(path).read_bytes()


def check_torch_container(path: str, data: bytes) -> None:
    """Raise if ``data`` is neither a whole torch zip archive (central directory at the very end,
    which a partial copy loses) nor the pre-1.6 format that starts with torch's pickled magic."""
    if not zipfile.is_zipfile(io.BytesIO(data)) and not data.startswith(_LEGACY_TORCH_MAGIC):
        raise CheckpointLoadError(corrupt_file_message(path, len(data)))


def checkpoint_globals(path: str, data: bytes) -> List[str]:
    """The globals of a checkpoint's pickle outside the allowlist; a file that is not a whole torch
    file, or whose pickle is damaged, is one :class:`CheckpointLoadError` saying it is corrupt."""
    check_torch_container(path, data)
    try:
        return extra_globals(data)
    except DamagedPickle as damage:
        raise CheckpointLoadError(corrupt_file_message(path, len(data), f"its pickle data is damaged ({damage})")) from None


__all__ = [
    "CheckpointLoadError",
    "CheckpointNotFoundError",
    "check_checkpoint_file",
    "check_torch_container",
    "checkpoint_globals",
    "corrupt_file_message",
    "folder_listing",
    "missing_file_message",
    "read_checkpoint_bytes",
]


def write_checkpoint(state: dict, output: Path) -> None:
    """``torch.save`` ``state`` to ``output`` through a temporary file, so that an interrupted run leaves no
    half-written checkpoint."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".part")
    torch.save(state, partial)
    os.replace(partial, output)
