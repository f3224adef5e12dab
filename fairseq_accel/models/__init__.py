"""Models of the plugin; importing this package registers them with fairseq."""
from fairseq_accel.models import lite_transformer, s2t_lite_transformer, s2t_sanm  # noqa: F401
