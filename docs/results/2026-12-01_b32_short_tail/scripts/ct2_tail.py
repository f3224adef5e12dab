import os
import json, time, ctranslate2, sys
sys.argv = ["x", "1"]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "one_thread.py")).read().split("def fast():")[0].replace("bs = int(sys.argv[1]); reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5", "bs=32; reps=1"))
srcs = B._ct2_sources(work)
tr = ctranslate2.Translator(str(ct2dir), device="cpu", inter_threads=1, intra_threads=1)
# the sentence with 201-long hypothesis: batch 1 odd position 2 -> index 32+5
for i in range(32, 64):
    toks = srcs[i][1]
    r5 = tr.translate_batch([toks], beam_size=5, num_hypotheses=5, return_scores=True, max_decoding_length=200)
    r1 = tr.translate_batch([toks], beam_size=5, num_hypotheses=1, return_scores=True, max_decoding_length=200)
    t = time.perf_counter(); [tr.translate_batch([toks], beam_size=5, num_hypotheses=1, max_decoding_length=200) for _ in range(5)]; t1 = (time.perf_counter() - t) / 5
    t = time.perf_counter(); [tr.translate_batch([toks], beam_size=5, num_hypotheses=5, max_decoding_length=200) for _ in range(5)]; t5 = (time.perf_counter() - t) / 5
    print(i, len(toks), "n1 len", len(r1[0].hypotheses[0]), "n5 lens", [len(h) for h in r5[0].hypotheses], f"t1 {t1*1e3:.1f} ms t5 {t5*1e3:.1f} ms")
