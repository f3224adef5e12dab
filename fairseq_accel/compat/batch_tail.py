"""Keep the last batch that fairseq 0.12 drops.

``fairseq.data.data_utils.batch_by_size`` ends with ``if bsz_mult > 1 and len(b[-1]) % bsz_mult != 0:
b = b[:-1]``: with the default ``--required-batch-size-multiple 8`` the final batch of every epoch, of
validation and of ``fairseq-generate`` is silently thrown away when its size is not a multiple of 8, so a
test set is scored on up to 7 sentences fewer than it has (fairseq issue #5036). :func:`install` wraps the
function to append the dropped tail as one more batch; all other batches are left exactly as fairseq
makes them.
"""
import functools
from typing import Callable, List

import numpy as np
from fairseq.data import data_utils


def keep_last_batch(batch_by_size: Callable[..., List[np.ndarray]]) -> Callable[..., List[np.ndarray]]:
    """Wrap ``batch_by_size`` so that every index ends up in a batch."""

    @functools.wraps(batch_by_size)
    def wrapper(indices, *args, **kwargs) -> List[np.ndarray]:
        if not isinstance(indices, np.ndarray):
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        batches = batch_by_size(indices, *args, **kwargs)
        covered = sum(len(batch) for batch in batches)
        if covered < len(indices):  # batches keep the order of ``indices``: the dropped ones are the tail
            batches = list(batches) + [indices[covered:]]
        return batches

    wrapper.keeps_last_batch = True
    return wrapper


def install() -> None:
    """Wrap ``data_utils.batch_by_size`` once (a second call leaves it as it is)."""
    if not getattr(data_utils.batch_by_size, "keeps_last_batch", False):
        data_utils.batch_by_size = keep_last_batch(data_utils.batch_by_size)
