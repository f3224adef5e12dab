import os
import threading
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tail25.py")).read().split('print("pid"')[0].replace("reps = int(sys.argv[2])", "reps = 20"))
gen.sentence_parallel = None
def timed(label, n):
    torch.set_num_threads(n)
    work.task.inference_step(gen, work.models, batch)
    t = time.perf_counter()
    for _ in range(reps): work.task.inference_step(gen, work.models, batch)
    print(label, n, "threads: %.1f ms" % ((time.perf_counter() - t) / reps * 1e3), flush=True)
for n in (1, 2):
    timed("main", n)
    th = threading.Thread(target=timed, args=("other", n)); th.start(); th.join()
