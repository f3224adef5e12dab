"""Checkpoints the user vouches for: a per-user trust store and the ``fairseq-accel-trust-checkpoint`` CLI.

A file whose pickle holds globals outside the weights-only allowlist
(:data:`~fairseq_accel.compat.pickle_globals.SAFE_GLOBALS`) loads only after the user vouches for
it: ``fairseq-accel-trust-checkpoint PATH`` records the file's SHA-256 *and the exact globals it was
trusted for*; a later load of that content allows just those, still through the weights-only
unpickler, and other content (or other globals) voids the trust. Globals that can execute code or
that the plugin does not know (:func:`~fairseq_accel.compat.pickle_globals.needs_code_execution`)
are trusted only with ``--allow-code-execution``, which prints what will be allowed; globals torch
never unpickles (os/sys) are never trusted.

Loaded by path by the startup hook (``fairseq_accel_startup``): imports only its sibling modules.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Dict, FrozenSet, NamedTuple, Optional, Sequence

from fairseq_accel.compat.checkpoint_files import CheckpointLoadError, checkpoint_globals, read_checkpoint_bytes
from fairseq_accel.compat.pickle_globals import describe_global, needs_code_execution, torch_blocked


class TrustEntry(NamedTuple):
    """One trusted file content: its hash, where it was, and the extra globals allowed for it."""

    digest: str
    path: str
    allowed: FrozenSet[str]


_trusted_in_process: Dict[str, TrustEntry] = {}


def trust_store_path() -> Path:
    """Per-user file of trusted checkpoints (``$XDG_CONFIG_HOME`` or ``~/.config``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "fairseq_accel" / "trusted_checkpoints.tsv"


def _persisted_trust() -> Dict[str, TrustEntry]:
    """sha256 -> entry, from the trust store (lines ``sha256<TAB>path<TAB>global,global``)."""
    store = trust_store_path()
    if not store.is_file():
        return {}
    trusted = {}
    for line in store.read_text(encoding="utf-8").splitlines():
        digest, _, rest = line.partition("\t")
        path, _, names = rest.partition("\t")
        if digest:
            trusted[digest] = TrustEntry(digest, path, frozenset(filter(None, names.split(","))))
    return trusted


def trust_entry(digest: str) -> Optional[TrustEntry]:
    """The trust recorded for this content hash, in this process or in the store; None if none."""
    return _trusted_in_process.get(digest) or _persisted_trust().get(digest)


def _store_line(entry: TrustEntry) -> str:
    """How the trust store (and ``--list``) writes an entry: ``sha256<TAB>path<TAB>global,global``."""
    return f"{entry.digest}\t{entry.path}\t{','.join(sorted(entry.allowed))}"


def blocked_message(path: str, blocked: Sequence[str]) -> str:
    """The one line for a file that references globals torch never unpickles (no trust can help)."""
    return (
        f"checkpoint {path} was not loaded: it references {', '.join(blocked)}, which torch never "
        "unpickles (a checkpoint has no business calling into os/sys); do not use this file, "
        "re-create it with fairseq-train"
    )


def trust_checkpoint(path: str, allow_code_execution: bool = False, persist: bool = False) -> TrustEntry:
    """Trust this exact file content for the extra globals it holds now; return what was recorded.

    Refuses (:class:`CheckpointLoadError`) globals that may execute code unless
    ``allow_code_execution``, and globals of modules torch never unpickles. The trust covers this
    process, or with ``persist=True`` every later process of this user; other content voids it.
    """
    data = read_checkpoint_bytes(path)
    names = checkpoint_globals(path, data)
    blocked = torch_blocked(names)
    if blocked:
        raise CheckpointLoadError(blocked_message(path, blocked))
    risky = needs_code_execution(names)
    if risky and not allow_code_execution:
        raise CheckpointLoadError(
            f"not trusting {path}: it can execute code when loaded, through "
            f"{'; '.join(describe_global(n) for n in risky)}; a model checkpoint never needs this. Only if you "
            "know what it runs: fairseq-accel-trust-checkpoint --allow-code-execution " + path
        )
    entry = TrustEntry(hashlib.sha256(data).hexdigest(), os.path.abspath(path), frozenset(names))
    _trusted_in_process[entry.digest] = entry
    if persist and _persisted_trust().get(entry.digest) != entry:
        store = trust_store_path()
        store.parent.mkdir(parents=True, exist_ok=True)
        with open(store, "a", encoding="utf-8") as f:
            f.write(_store_line(entry) + "\n")
    return entry


# --------------------------------------------------------------------------------------------
# Command line: fairseq-accel-trust-checkpoint
# --------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Record checkpoints the user trusts, with the globals each may unpickle."""
    parser = argparse.ArgumentParser(
        prog="fairseq-accel-trust-checkpoint",
        description="Trust checkpoint files (by SHA-256, for the pickled globals they hold now) whose "
        "objects are outside fairseq_accel's weights-only allowlist. Only do this for files from a "
        "source you trust.",
    )
    parser.add_argument("paths", nargs="*", help="checkpoint files to trust")
    parser.add_argument("--list", action="store_true", help="print the trusted files and exit")
    parser.add_argument(
        "--allow-code-execution", action="store_true",
        help="also trust globals that can execute code or touch the system, or that fairseq_accel "
        "does not know (printed before they are recorded)",
    )
    options = parser.parse_args(argv)
    if options.list or not options.paths:
        print(f"# {trust_store_path()}")
        for entry in _persisted_trust().values():
            print(_store_line(entry))
        return 0
    for path in options.paths:
        try:
            entry = trust_checkpoint(path, options.allow_code_execution, persist=True)
        except CheckpointLoadError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        risky = needs_code_execution(sorted(entry.allowed))
        if risky:
            print(f"WARNING: loading {path} may execute code; allowed: {'; '.join(describe_global(n) for n in risky)}")
        print(f"trusted {path} (sha256 {entry.digest}); extra globals: {', '.join(sorted(entry.allowed)) or 'none'}")
    return 0


__all__ = [
    "TrustEntry",
    "blocked_message",
    "main",
    "trust_checkpoint",
    "trust_entry",
    "trust_store_path",
]
