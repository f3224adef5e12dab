"""What the measurements here share: the transformer_mini of 2026-12-01_step_buffers (FLOAT), its calibrated int8
copy (INT8) and the mini NMT test set, loaded as fairseq-accel-benchmark loads them."""
import argparse
import threading
import time

import torch

from fairseq_accel import benchmarking as B
from fairseq_accel.inference import sentence_parallel as SP

FLOAT = "/work/nmt_exp/tf_mini/ckpt/checkpoint_best.pt"
INT8 = "/work/nmt_exp/tf_mini/c_int8.pt"
DATA = "/work/main/egs/mini_l10n/nmt/data/bin_unigram8000"


def workload(batch_size: int, sentences: int = 64, threads: int = 1, system: str = "fast-w8a8-kv8"):
    """(benchmark arguments, workload, generator) of ``system`` ("fast" decodes FLOAT, the int8 systems INT8) on the
    first ``sentences`` test sentences in batches of ``batch_size``, at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    int8 = system != "fast"
    args = argparse.Namespace(path=INT8 if int8 else FLOAT, ct2_from=FLOAT, data=DATA, config_yaml="config.yaml",
                              gen_subset="test", max_sentences=sentences, remove_bpe="sentencepiece", beam=5,
                              max_len_a=0, max_len_b=200, int8_min_weights=0, task=None)
    task, models = B.load_checkpoint(args)
    int8_model = B.take_int8_model(task, models, 0) if int8 else None
    task.load_dataset("test")
    work = B.build_workload(args, batch_size, task, models, int8_model)
    return args, work, B._fairseq_generator(work, system)


def decode(work, generator, batches=None):
    """The hypotheses of each batch (default: all of the workload's)."""
    return [work.task.inference_step(generator, work.models, batch) for batch in batches or work.batches]


def best_of(repeats: int, run) -> float:
    """The shortest of ``repeats`` timed calls of ``run`` (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def record_shards(serial: bool = False):
    """From now on, every sentence shard's (thread, start, end, sentences, rows) and every sharded batch's (start,
    end), in two lists it returns (clear them to start over); ``serial``: the shards take turns."""
    shards, batches = [], []
    turns = threading.Lock() if serial else None
    on_one_thread, parallel_decode = SP._on_one_thread, SP.SentenceParallel.decode

    def timed_shard(*args, **kwargs):
        if turns:
            turns.acquire()
        start = time.perf_counter()
        result = on_one_thread(*args, **kwargs)
        shards.append((threading.current_thread().name[-3:], start, time.perf_counter(), len(result[0]), result[1]))
        if turns:
            turns.release()
        return result

    def timed_decode(self, *args, **kwargs):
        start = time.perf_counter()
        result = parallel_decode(self, *args, **kwargs)
        batches.append((start, time.perf_counter()))
        return result

    SP._on_one_thread, SP.SentenceParallel.decode = timed_shard, timed_decode
    return shards, batches
