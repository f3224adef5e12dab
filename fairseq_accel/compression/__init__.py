"""Compression of the plugin's models: progressive sparsity and ADMM weight quantization during
``fairseq-train`` fine-tuning, activation calibration and the compressed checkpoint format of
``fairseq-accel-compress`` (design.md §5; arXiv 2104.05784)."""

#: Where a compression fine-tune keeps its state (masks, importance sums) in a checkpoint's ``task_state``;
#: here, not in the task module, so that reading it (checkpoint averaging) does not import fairseq.
COMPRESSION_KEY = "fairseq_accel_compression"
