"""``fairseq-accel-benchmark-encoder`` without installing the package: ``python scripts/benchmark_speech_encoder.py --help``."""
import pathlib, sys  # noqa: E401
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fairseq_accel.cli.benchmark_encoder import main  # noqa: E402
sys.exit(main())
