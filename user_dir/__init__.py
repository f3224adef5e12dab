"""Shim for ``--user-dir user_dir``: fairseq imports this folder as a module; importing
``fairseq_accel.plugin`` registers every model, criterion and task of the plugin."""
import fairseq_accel.plugin  # noqa: F401
