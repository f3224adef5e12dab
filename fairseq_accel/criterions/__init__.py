"""Criterions of the plugin; importing this package registers them with fairseq."""
from fairseq_accel.criterions import joint_ctc_attention  # noqa: F401
from fairseq_accel.criterions import minilm_distillation  # noqa: F401
