import sys, copy, re, torch, logging
import fairseq_accel.plugin  # registers the plugin (its package __init__ stopped doing that on 2026-11-30)
from fairseq import checkpoint_utils
from fairseq_accel.inference.int8_execution import convert_to_int8, call_projection_modules
from fairseq_accel.compat.checkpoint_loading import read_checkpoint
from fairseq_accel.compat.checkpoint_files import COMPRESSED_KEY
from fairseq_accel.compression.activation_calibration import calibration_batches
logging.getLogger("fairseq").setLevel(logging.WARNING)
torch.set_num_threads(1)
path, data = sys.argv[1], sys.argv[2]
models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
model = models[0].eval()
section = read_checkpoint(path)[COMPRESSED_KEY]
batches = list(calibration_batches(task, model, "valid", 4, 4000))
def loss(m):
    tot = n = 0
    with torch.no_grad():
        for s in batches:
            out = m(**s["net_input"])
            lp = m.get_normalized_probs(out, log_probs=True)
            t = s["target"]
            nll = -lp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            mask = t.ne(task.target_dictionary.pad())
            tot += nll[mask].sum().item(); n += mask.sum().item()
    return tot / n
call_projection_modules(model)
print("float", round(loss(model), 4), flush=True)
def variant(keep):
    m = copy.deepcopy(model)
    sec = dict(section); act = dict(sec["activations"]); act["scales"] = {k: v for k, v in act["scales"].items() if not re.search(keep, k)} if keep else act["scales"]
    sec["activations"] = act
    names = convert_to_int8(m, sec, "x", 0)  # every linear layer (the --int8-min-weights floor came later)
    return loss(m), len(names)
for keep in sys.argv[3:]:
    l, n = variant(keep if keep != "none" else None)
    print(f"float kept for {keep!r}: int8 layers {n} loss {l:.4f}", flush=True)
