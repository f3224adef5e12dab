"""Command-line tools of fairseq_accel (installed as ``fairseq-accel-*`` console scripts)."""
