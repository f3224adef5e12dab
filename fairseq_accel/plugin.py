"""The plugin proper: importing this module registers every model, architecture, criterion and task of
fairseq_accel with fairseq (``--user-dir user_dir`` does it from a checkout), installs the fairseq 0.12
patches and makes fairseq checkpoints load under torch >= 2.6.

It is a module of its own, not the package's ``__init__``, so that the parts that need no fairseq (the
data preparation of ``fairseq-accel-prepare``, checkpoint averaging and trust) start without importing
it: fairseq's import takes ~3 s on these machines, more than most data preparation commands run.
"""
import logging

# fairseq's text_to_speech task (imported by `import fairseq`) logs "Please install tensorboardX" at
# INFO on import; it says nothing about this plugin's work and would stand before every one-line error
# of our CLIs. Only that logger is quietened.
logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)

try:
    import fairseq  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without fairseq installed
    raise ImportError(
        "fairseq_accel needs fairseq, which is not installed in this Python. On Python 3.11/3.12 install "
        "the maintained build without touching torch:\n"
        "    pip install --no-deps ve-fairseq==0.12.3\n"
        "then its dependencies (see the Makefile's FAIRSEQ_DEPS), without torchaudio. "
        "`make test` or `make demo` set all of this up in .venv."
    ) from err

from fairseq_accel.compat import (  # noqa: E402
    background_consumer,
    batch_tail,
    checkpoint_loading,
    compressed_stock_task,
    cpu_distributed,
    s2t_config_check,
)

#: The fairseq 0.12 patches the plugin installs (fairseq_accel/compat/; importing them patches nothing).
COMPAT_PATCHES = (
    checkpoint_loading,  # torch>=2.6 checkpoint loading: per-load allowlist, trust, one-line errors
    batch_tail,  # fairseq 0.12 drops a last batch that is not a multiple of --required-batch-size-multiple
    s2t_config_check,  # clear errors for files a speech_to_text config.yaml names but that are missing
    background_consumer,  # fairseq's batch-loading thread is stopped before exit (no SIGABRT after a run)
    cpu_distributed,  # --cpu --distributed-world-size N trains N gloo ranks (fairseq 0.12 counts CUDA devices)
    compressed_stock_task,  # a compressed checkpoint under a stock task: one warning that it decodes in float32
)
for _patch in COMPAT_PATCHES:
    _patch.install()

from fairseq_accel.compression.compressed_format import read_compressed_checkpoint  # noqa: E402

checkpoint_loading.set_compressed_reader(read_compressed_checkpoint)  # fairseq-accel-compress output loads too

from fairseq_accel import models  # noqa: E402,F401  (registers models and architectures)
from fairseq_accel import criterions  # noqa: E402,F401
from fairseq_accel import tasks  # noqa: E402,F401  (translation_accel, speech_to_text_accel)
