"""``fairseq-accel-average`` without installing the package: ``python scripts/average_checkpoints.py --help``."""
import pathlib, sys  # noqa: E401
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fairseq_accel.cli.average import main  # noqa: E402
sys.exit(main())
