"""Startup hook of fairseq_accel: make stock fairseq CLIs load checkpoints even without --user-dir.

``pip install`` (normal or ``-e``) puts ``fairseq_accel_startup.pth`` into site-packages, and
Python runs its one line (import this module, if it can be found) at every interpreter start. So
this module is stdlib-only and at start does nothing but put a finder on ``sys.meta_path`` (~2 ms).
Only when a process imports ``fairseq.checkpoint_utils`` does it load
``fairseq_accel/checkpoint_compat.py`` (the weights-only allowlist and the one-line load errors),
without importing the rest of the plugin: models are still registered only by ``--user-dir``.
Any failure here becomes a warning; fairseq then behaves as stock.
"""
import importlib.util
import os
import sys

_TRIGGER = "fairseq.checkpoint_utils"
_COMPAT = "fairseq_accel.checkpoint_compat"


def _load_checkpoint_compat() -> None:
    """Execute fairseq_accel/checkpoint_compat.py as ``fairseq_accel.checkpoint_compat``.

    The package's ``__init__`` is skipped on purpose (it imports all of fairseq and registers the
    plugin's models); a later ``import fairseq_accel`` reuses this module from ``sys.modules``.
    """
    if _COMPAT in sys.modules:
        return
    try:
        package = importlib.util.find_spec("fairseq_accel")
        folders = list(package.submodule_search_locations or []) if package else []
        paths = [os.path.join(f, "checkpoint_compat.py") for f in folders]
        path = next(p for p in paths if os.path.isfile(p))
        spec = importlib.util.spec_from_file_location(_COMPAT, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_COMPAT] = module
        spec.loader.exec_module(module)
    except Exception as error:  # never break `import fairseq` because of the hook
        sys.modules.pop(_COMPAT, None)
        import warnings

        warnings.warn(
            f"fairseq_accel startup hook could not prepare checkpoint loading ({error!r}); "
            "pass --user-dir <path to fairseq_accel checkout>/user_dir to load checkpoints",
            RuntimeWarning,
        )


class _CheckpointUtilsFinder:
    """Meta-path finder that only watches for ``fairseq.checkpoint_utils`` and then retires."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != _TRIGGER:
            return None
        if cls in sys.meta_path:
            sys.meta_path.remove(cls)
        spec = None
        for finder in sys.meta_path:  # let the real finders locate fairseq's module
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_module_then_patch(module):
            exec_module(module)
            _load_checkpoint_compat()

        try:
            spec.loader.exec_module = exec_module_then_patch
        except AttributeError:  # a loader that cannot be patched: stay stock
            pass
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once, and only while fairseq is not loaded)."""
    if _TRIGGER in sys.modules:
        _load_checkpoint_compat()
    elif _CheckpointUtilsFinder not in sys.meta_path:
        sys.meta_path.insert(0, _CheckpointUtilsFinder)


install()
