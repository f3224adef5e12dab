"""Models of the plugin; importing this package registers them with fairseq."""
from fairseq_accel.models import lite_transformer  # noqa: F401
