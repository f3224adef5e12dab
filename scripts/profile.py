"""``fairseq-accel-profile`` without installing the package: ``python scripts/profile.py --help``."""
import pathlib, sys  # noqa: E401
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # not scripts/: this file would shadow stdlib `profile`
from fairseq_accel.cli.profile import main  # noqa: E402
sys.exit(main())
