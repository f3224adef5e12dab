"""Compression of the plugin's models: progressive sparsity and ADMM weight quantization during
``fairseq-train`` fine-tuning (design.md §5; arXiv 2104.05784)."""
