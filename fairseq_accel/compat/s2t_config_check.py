"""Clear errors for files that a speech_to_text ``config.yaml`` names but that do not exist.

Stock fairseq 0.12.3 finds out late and obscurely: a missing ``global_cmvn.stats_npz_path`` fails inside
``numpy.load`` while the first dataset is built, a missing sentencepiece model inside sentencepiece.
:func:`install` (``fairseq_accel`` calls it, so ``--user-dir user_dir`` is enough) wraps
``SpeechToTextTask.setup_task`` -- which every command building the stock task or a subclass goes
through, before any data is read -- so that it first runs :func:`check_s2t_data_config`. That raises
one ``FileNotFoundError`` naming ``config.yaml``, each field with a missing file, and the path.

Paths are checked where fairseq will open them: ``vocab_filename`` under the data folder,
``bpe_tokenizer.sentencepiece_model`` as given or else under the folder of ``config.yaml`` (fairseq
tries both), and ``global_cmvn.stats_npz_path`` as given, i.e. relative to the current directory when
it is relative (the global_cmvn transform does not look in the data folder).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from fairseq.data.audio.data_cfg import S2TDataConfig
from fairseq.tasks.speech_to_text import SpeechToTextTask


def missing_files(config_path: Path, data_root: Path) -> List[Tuple[str, Path, str]]:
    """(field, path, hint) for each file named by the S2T data config at ``config_path`` that does not
    exist where fairseq looks for it; ``data_root`` is the task's data folder."""
    config = S2TDataConfig(Path(config_path))
    missing = []
    vocab = data_root / config.vocab_filename
    if not vocab.is_file():
        missing.append(("vocab_filename", vocab, ""))
    bpe = config.bpe_tokenizer  # relative paths already resolved against the config's folder if there
    if bpe.get("bpe") == "sentencepiece" and "sentencepiece_model" in bpe:
        model = Path(bpe["sentencepiece_model"])
        if not model.is_file():
            missing.append(("bpe_tokenizer.sentencepiece_model", model, ""))
    stats = (config.config.get("global_cmvn") or {}).get("stats_npz_path")
    if stats is not None and not Path(stats).is_file():
        hint = ""
        if not Path(stats).is_absolute():
            hint = f" (relative to the current directory {Path.cwd()}; fairseq opens it as given"
            if (config.root / stats).is_file():
                hint += f", not under {config.root}: write it as an absolute path"
            hint += ")"
        missing.append(("global_cmvn.stats_npz_path", Path(stats), hint))
    return missing


def check_s2t_data_config(config_path: Path, data_root: Path) -> None:
    """Raise one ``FileNotFoundError`` listing every file of :func:`missing_files`; pass if there is none."""
    missing = missing_files(config_path, data_root)
    if missing:
        listed = "; ".join(f"{field}: {path} does not exist{hint}" for field, path, hint in missing)
        raise FileNotFoundError(f"{config_path} names missing files: {listed}")


def install() -> None:
    """Wrap ``SpeechToTextTask.setup_task`` once (a second call leaves it as it is)."""
    stock = SpeechToTextTask.setup_task.__func__
    if getattr(stock, "checks_data_files", False):
        return

    def setup_task(cls, args, **kwargs):
        """fairseq's ``SpeechToTextTask.setup_task``, after :func:`check_s2t_data_config`."""
        data_root = Path(args.data)
        check_s2t_data_config(data_root / args.config_yaml, data_root)
        return stock(cls, args, **kwargs)

    setup_task.checks_data_files = True
    SpeechToTextTask.setup_task = classmethod(setup_task)
