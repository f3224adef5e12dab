"""CTranslate2 int8 alone in its process, at a given intra-thread count (ct2_intra_threads.md).

    python ct2_alone.py convert FLOAT_CKPT NMT_DATA OUT_DIR   # the benchmark's conversion + the first 64 test sources
    python ct2_alone.py THREADS OUT_DIR                        # best of 6 passes, beam 5, batch 1
"""
import argparse
import json
import sys
import time
from pathlib import Path


def convert(checkpoint: str, data: str, out: Path) -> None:
    from fairseq_accel import benchmarking

    args = argparse.Namespace(path=checkpoint, ct2_from=None, data=data, config_yaml="config.yaml", gen_subset="test",
                              max_sentences=64, remove_bpe="sentencepiece", beam=5, max_len_a=0, max_len_b=200,
                              int8_min_weights=0)
    task, models = benchmarking.load_checkpoint(args)
    task.load_dataset("test")
    work = benchmarking.build_workload(args, 1, task, models, None)
    benchmarking._ct2_convert(args, work, "int8", out)
    (out / "sources.json").write_text(json.dumps([tokens for _, tokens in benchmarking._ct2_sources(work)]))


def translate(threads: int, out: Path) -> None:
    import ctranslate2

    sources = json.loads((out / "sources.json").read_text())
    translator = ctranslate2.Translator(str(out / "int8"), device="cpu", inter_threads=1, intra_threads=threads)
    seconds = []
    for _ in range(6):
        start = time.perf_counter()
        results = translator.translate_batch(sources, beam_size=5, max_batch_size=1, max_decoding_length=200)
        seconds.append(time.perf_counter() - start)
    tokens = sum(len(result.hypotheses[0]) + 1 for result in results)  # + EOS, as fairseq counts
    print(f"ct2 intra {threads}: best {min(seconds):.3f} s, {tokens / min(seconds):.0f} tok/s")


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        convert(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    else:
        translate(int(sys.argv[1]), Path(sys.argv[2]))
