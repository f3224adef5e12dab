"""Startup hook of fairseq_accel: make stock fairseq CLIs load checkpoints even without --user-dir.

``pip install`` (normal or ``-e``) puts ``fairseq_accel_startup.pth`` into site-packages, and
Python runs its one line (import this module, if it can be found) at every interpreter start. So
this module is stdlib-only and at start does nothing but put a finder on ``sys.meta_path`` (~2 ms).
Only when a process imports ``fairseq.checkpoint_utils`` does it load
``fairseq_accel/compat/checkpoint_loading.py`` and the compat modules it imports, by path, and call
its ``install()`` (the per-load weights-only allowlist, trust and the one-line load errors), without
importing the rest of the plugin: models are still registered only by ``--user-dir``.
Any failure here becomes a warning; fairseq then behaves as stock.
"""
import importlib.util
import os
import sys

_TRIGGER = "fairseq.checkpoint_utils"
_PACKAGE = "fairseq_accel"
_COMPAT_PACKAGE = "fairseq_accel.compat"
#: The compat modules checkpoint loading needs, each after the ones it imports (they import each
#: other only as ``from fairseq_accel.compat.<module> import <name>``, which finds a module already
#: in ``sys.modules`` without running the packages' ``__init__``).
_COMPAT_MODULES = ("pickle_globals", "checkpoint_files", "checkpoint_trust", "checkpoint_loading")
_CHECKPOINT_LOADING = f"{_COMPAT_PACKAGE}.checkpoint_loading"


def _compat_folder() -> str:
    """The folder of ``fairseq_accel.compat``, found without importing ``fairseq_accel``."""
    package = importlib.util.find_spec(_PACKAGE)
    folders = list(package.submodule_search_locations or []) if package else []
    for folder in folders:
        compat = os.path.join(folder, "compat")
        if all(os.path.isfile(os.path.join(compat, f"{name}.py")) for name in _COMPAT_MODULES):
            return compat
    raise ImportError(f"no {_PACKAGE}/compat folder with {', '.join(_COMPAT_MODULES)} in {folders}")


def _load_compat_modules(loaded: list[str]) -> None:
    """Execute the compat modules in dependency order, each registered in ``sys.modules`` under its
    real name first; a module already there is reused. Appends the names it registers to ``loaded``."""
    folder = _compat_folder()
    for name in _COMPAT_MODULES:
        fullname = f"{_COMPAT_PACKAGE}.{name}"
        if fullname in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(fullname, os.path.join(folder, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[fullname] = module
        loaded.append(fullname)
        spec.loader.exec_module(module)


def _install_checkpoint_loading() -> None:
    """Load ``fairseq_accel.compat.checkpoint_loading`` (and what it imports) and call its ``install()``.

    The packages' ``__init__`` files are skipped on purpose (the plugin's imports all of fairseq and
    registers its models); a later ``import fairseq_accel.plugin`` reuses these modules from ``sys.modules``.
    On failure the modules registered here are removed again, so that import starts afresh.
    """
    loaded: list[str] = []
    try:
        if _CHECKPOINT_LOADING not in sys.modules:
            _load_compat_modules(loaded)
        sys.modules[_CHECKPOINT_LOADING].install()
    except Exception as error:  # never break `import fairseq` because of the hook
        for fullname in loaded:
            sys.modules.pop(fullname, None)
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
            _install_checkpoint_loading()

        try:
            spec.loader.exec_module = exec_module_then_patch
        except AttributeError:  # a loader that cannot be patched: stay stock
            pass
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once, and only while fairseq is not loaded)."""
    if _TRIGGER in sys.modules:
        _install_checkpoint_loading()
    elif _CheckpointUtilsFinder not in sys.meta_path:
        sys.meta_path.insert(0, _CheckpointUtilsFinder)


install()
