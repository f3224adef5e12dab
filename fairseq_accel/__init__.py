"""fairseq_accel: a fairseq plugin for smaller and faster Transformer ASR and NMT.

Importing this package registers every model, architecture, criterion and task of the plugin with
fairseq (``--user-dir user_dir`` does it from a checkout) and makes fairseq checkpoints load under
torch >= 2.6.
"""
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

__version__ = "0.1.0"

from fairseq_accel import checkpoint_compat  # noqa: E402,F401  (torch>=2.6 checkpoint loading)
from fairseq_accel import models  # noqa: E402,F401  (registers models and architectures)
from fairseq_accel.data import batch_tail_fix  # noqa: E402,F401  (fairseq 0.12 drops a last batch)
from fairseq_accel import criterions  # noqa: E402,F401
from fairseq_accel.data import s2t_config_check  # noqa: E402,F401  (clear errors for missing S2T data files)
from fairseq_accel import tasks  # noqa: E402,F401  (translation_accel, speech_to_text_accel)
