"""Compression of the plugin's models: progressive sparsity and ADMM weight quantization during
``fairseq-train`` fine-tuning, activation calibration and the compressed checkpoint format of
``fairseq-accel-compress`` (design.md §5; arXiv 2104.05784)."""
