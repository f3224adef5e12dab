"""Patches of fairseq 0.12 that the plugin needs, one module per patch, each with one ``install()``.

Importing a module here patches nothing: ``fairseq_accel/plugin.py`` installs them from one list
(``COMPAT_PATCHES``), and the startup hook (``fairseq_accel_startup``) installs
:mod:`~fairseq_accel.compat.checkpoint_loading` (with the compat modules it imports, and nothing
else of the plugin) for stock fairseq CLIs. Checkpoint loading is split by concept:
:mod:`~fairseq_accel.compat.pickle_globals` (allowlist, classification and static scan of pickle
globals), :mod:`~fairseq_accel.compat.checkpoint_files` (the one-line errors and the file checks),
:mod:`~fairseq_accel.compat.checkpoint_trust` (the trust store and its CLI) and
:mod:`~fairseq_accel.compat.checkpoint_loading` (the checked load and the fairseq wrappers).
"""
