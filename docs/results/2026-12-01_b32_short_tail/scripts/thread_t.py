"""Sentence 25 at batch 1 at 1 and 2 OpenMP threads, on the main thread and on another Python thread."""
import threading
import time

import torch

from common import decode, workload

_, work, gen = workload(1)
gen.sentence_parallel = None  # every operation on the thread count, no shards
batch = [b for b in work.batches if b["id"].item() == 25]


def timed(label: str, threads: int, repeats: int = 20) -> None:
    torch.set_num_threads(threads)
    decode(work, gen, batch)
    start = time.perf_counter()
    for _ in range(repeats):
        decode(work, gen, batch)
    print(label, threads, "threads: %.1f ms" % ((time.perf_counter() - start) / repeats * 1e3), flush=True)


for threads in (1, 2):
    timed("main", threads)
    other = threading.Thread(target=timed, args=("other", threads))
    other.start()
    other.join()
