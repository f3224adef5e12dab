"""CTranslate2 int8 on each sentence of the second batch of 32 alone (1 thread): its best hypothesis' length, the
lengths of its 5 finished hypotheses and the time with 1 and 5 hypotheses asked."""
import time
from pathlib import Path

import ctranslate2

from common import workload
from fairseq_accel import benchmarking as B

args, work, _ = workload(32)
translator = ctranslate2.Translator(str(B._ct2_convert(args, work, "int8", Path("/tmp/ct2conv_ot"))), device="cpu",
                                    inter_threads=1, intra_threads=1)


def translate(tokens, hypotheses: int):
    return translator.translate_batch([tokens], beam_size=5, num_hypotheses=hypotheses, max_decoding_length=200)


def mean_seconds(tokens, hypotheses: int) -> float:
    start = time.perf_counter()
    for _ in range(5):
        translate(tokens, hypotheses)
    return (time.perf_counter() - start) / 5


sources = B._ct2_sources(work)
for index in range(32, 64):
    tokens = sources[index][1]
    one, five = translate(tokens, 1), translate(tokens, 5)
    print(index, len(tokens), "n1 len", len(one[0].hypotheses[0]), "n5 lens", [len(h) for h in five[0].hypotheses],
          f"t1 {mean_seconds(tokens, 1) * 1e3:.1f} ms t5 {mean_seconds(tokens, 5) * 1e3:.1f} ms")
