#!/usr/bin/env bash
# Offline mini recipe: German->English translation of real software messages (the machine's gettext
# catalogs, /usr/share/locale/de/LC_MESSAGES/*.mo), Lite Transformer (LSRA) against a stock fairseq
# transformer of matched Mult-Adds. Needs no download; `make demo` runs it.
#
# The console shows one line per stage, progress bars and the tables; the full output of each command is
# in its log: data/text/prepare.log, data/spm_*/spm.log, data/bin_*/binarize.log, exp/<config>/train.log,
# exp/<config>/decode_<subset>/generate.txt, exp/<config>/profile.log, exp/<config>/benchmark.log. A failing
# command prints the end of its log and the log's path; --verbose true shows everything on the console.
#
# Stages (run a range with --stage N --stop-stage M; finished stages leave .done markers and are
# skipped when the recipe runs again; an interrupted training resumes from checkpoint_last.pt):
#   1  extract, clean, dedup and split (de, en) pairs from the catalogs (fairseq-accel-prepare gettext)
#   2-6 the shared NMT pipeline (egs/tools/nmt.sh): joint sentencepiece unigram model,
#      fairseq-preprocess (joined dictionary), fairseq-train per config, fairseq-generate (beam 5),
#      sacrebleu BLEU/chrF and one results table (exp/RESULTS.md)
#   7  decoding speed: each --bench_configs checkpoint compressed to int8 (fairseq-accel-compress, calibrated
#      on valid: exp/<config name>/int8/compressed.pt), then fairseq-accel-benchmark on the first
#      --bench_sentences test sentences: stock SequenceGenerator and the fast generator in float32, the fast
#      generator with the int8 layers and int8 self-attention cache, CTranslate2 float32 and int8 of the float
#      checkpoint; batch 1 and 32, beam 5, each system at its best of 1 and 2 threads (exp/<config
#      name>/BENCHMARK.md, its rows in benchmark.json and BLEU against decoded tokens/s in frontier.png)
#   8  compression (egs/tools/nmt.sh): fine-tune the trained --compress_base model (200 updates) with each of
#      --compress_configs (conf/compress/: 50 % unstructured, 2:4 and row sparsity, 8-bit ADMM, 50 % + ADMM,
#      55 % + 4-bit ADMM of everything: the >= 10x model),
#      decode it like the base, add its row with the sparsity reached to exp/RESULTS.md
#      (exp/<base>__<compress name>/)
#   9  sparsity sweep (egs/tools/nmt.sh): the same fine-tune at 0 (no pruning), 50, 70, 80, 90 % unstructured
#      and row sparsity and 2:4, BLEU against sparsity in exp/<base>/sparsity_sweep.{md,json,png}
#   10 post-training compression (egs/tools/nmt.sh): fairseq-accel-compress of the --compress_base model and
#      of each fine-tune stage 8 trained (calibration on valid, int8; conf/compress/sparse50_admm4_all.yaml
#      adds int4), decoded in int8: bytes, BLEU and tokens/s before and after in exp/COMPRESSION.md,
#      BLEU against size in exp/compression.png (`make demo` runs it on the base model)
#   11 distillation teacher (egs/tools/nmt.sh): the --teacher_exp model, or --distill_teacher trained into
#      exp/<its name>; with a sequence-level KD config, the training set translated by it (beam 5) and binarized
#   12 distillation (egs/tools/nmt.sh): the half-width --distill_student alone and distilled with each of
#      --distill_configs (conf/distill/: word-level KD + MiniLM attention/value relations + LSRA convolution
#      attention transfer, sequence-level KD, both), decoded; teacher vs student alone vs distilled in
#      exp/DISTILL.md. With the long teacher already trained (see below):
#        ./run.sh --stage 11 --stop_stage 12 --exp_dir exp_distill --teacher_exp exp_long/lite_transformer_mini_long
# Stages 8-12 are not run by default (stop_stage 7; 16 fine-tunes of the mini model). After stages 1-7:
#   ./run.sh --stage 8 --stop_stage 8    # the compressed rows of exp/RESULTS.md
#   ./run.sh --stage 9 --stop_stage 9    # the sweep: exp/lite_transformer_mini/sparsity_sweep.{md,json,png}
#   ./run.sh --stage 10 --stop_stage 10  # int8 (and int4) checkpoints of the base and the stage-8 models
#
# The default configs fit the demo budget (a few minutes of CPU each); conf/tuning/*_long.yaml train
# longer (6 epochs, ~40 minutes), keep their last 3 epoch checkpoints and are decoded as their average:
#   ./run.sh --stage 4 --stop_stage 6 --average_checkpoints 3 \
#     --configs "conf/tuning/lite_transformer_mini_long.yaml conf/tuning/transformer_mini_long.yaml"
set -euo pipefail

stage=1                 # first stage to run
stop_stage=7            # last stage to run (8-10, compression, on request)
locale_dir=/usr/share/locale  # root of the gettext catalogs
configs="conf/lite_transformer_mini.yaml conf/transformer_mini.yaml"  # experiments (space separated)
data_dir=data           # text, sentencepiece and binarized data
exp_dir=exp             # experiments: <exp_dir>/<config name>/
bpe_type=unigram        # sentencepiece model type (unigram or bpe)
bpe_vocab_size=8000     # joint sentencepiece vocabulary
nj=2                    # parallel jobs for sentencepiece and binarization
train_args=""           # extra fairseq-train arguments for every config, e.g. "--max-update 50"
decode_args=""          # extra fairseq-generate arguments for every config
average_checkpoints=0   # decode the average of the last N epoch checkpoints (0: the best; a config must keep them)
train_jobs=2            # trainings run at a time, one thread each (faster here than one after the other)
gen_subset=test         # split decoded (test or valid)
bench_configs="conf/transformer_mini.yaml"  # experiments whose decoding speed stage 7 measures
bench_sentences=128     # test sentences the stage-7 benchmark decodes (0: all): four batches of 32 (of 64, one
                        # sentence run to the length limit decided the batch-32 rows: docs/results/2026-12-01_b32_short_tail)
bench_args="--threads 1 2 --ct2-threads 1 --repeats 3 --systems fast fast-w8a8-kv8 ct2-float32 ct2-int8"  # thread counts (CTranslate2: 1, its best here, see the README), systems and repeats
compress_base=conf/lite_transformer_mini.yaml  # trained experiment that stages 8-9 fine-tune
compress_configs="conf/compress/sparse50.yaml conf/compress/sparse_2of4.yaml conf/compress/sparse_row50.yaml conf/compress/admm8.yaml conf/compress/sparse50_admm8.yaml conf/compress/sparse55_admm4_all.yaml"  # compression fine-tunes of stage 8
compress_args=""        # extra fairseq-train arguments for the fine-tunes of stages 8-9 (train_args are not used there)
sweep_config=conf/compress/sparse50.yaml  # budget and schedule of every sparsity sweep point (stage 9)
quantize_args=""        # extra fairseq-accel-compress arguments of stage 10 (post-training compression)
sweep_sparsities="0 50 70 80 90"  # sparsities (%) of the sweep
sweep_patterns="unstructured row 2:4"  # sweep patterns; an N:M pattern has one point, at sparsity 1-N/M
distill_teacher=conf/tuning/lite_transformer_mini_long.yaml  # teacher experiment of stages 11-12 (trained unless --teacher_exp holds one)
teacher_exp=""          # experiment directory of an already trained teacher, e.g. exp_long/lite_transformer_mini_long
distill_student=conf/distill/lite_transformer_half.yaml  # student of stage 12: the teacher's config at half width
distill_configs="conf/distill/minilm.yaml conf/distill/seqkd.yaml conf/distill/minilm_seqkd.yaml"  # stage 12's distillations of the student
verbose=false           # show the full output of every command on the console (it always goes to the logs)

printf -v recipe_cmd '%q ' "$0" "$@"  # this command line, quoted in the sparsity sweep's table

recipe_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools_dir="${recipe_dir}/../../tools"
. "${tools_dir}/recipe.sh"
cd "${recipe_dir}"  # configs and data are relative to the recipe
export PYTHONPATH="${PYTHONPATH:+${PYTHONPATH}:}$(cd "${recipe_dir}/../../.." && pwd)"  # the checkout's plugin, if not installed
text_dir="${data_dir}/text"

if in_stage 1; then
  log "Stage 1: (de, en) pairs from ${locale_dir}/de/LC_MESSAGES into ${text_dir}"
  if ! stage_done "${text_dir}/.done" "Stage 1"; then
    require fairseq-accel-prepare
    run_logged "${text_dir}/prepare.log" -- fairseq-accel-prepare gettext --locale-dir "${locale_dir}" \
      --src-lang de --tgt-lang en --out-dir "${text_dir}"
    touch "${text_dir}/.done"
  fi
fi

"${tools_dir}/nmt.sh" --stage "${stage}" --stop_stage "${stop_stage}" --src de --tgt en \
  --text_dir "${text_dir}" --data_dir "${data_dir}" --exp_dir "${exp_dir}" --configs "${configs}" \
  --bpe_type "${bpe_type}" --bpe_vocab_size "${bpe_vocab_size}" --joined_dictionary true --bleu_tokenize 13a \
  --nj "${nj}" --train_args "${train_args}" --decode_args "${decode_args}" --average_checkpoints "${average_checkpoints}" --train_jobs "${train_jobs}" --gen_subset "${gen_subset}" \
  --compress_base "${compress_base}" --compress_configs "${compress_configs}" \
  --compress_args "${compress_args}" --quantize_args "${quantize_args}" \
  --sweep_config "${sweep_config}" --sweep_sparsities "${sweep_sparsities}" \
  --sweep_patterns "${sweep_patterns}" \
  --distill_teacher "${distill_teacher}" --teacher_exp "${teacher_exp}" --distill_student "${distill_student}" \
  --distill_configs "${distill_configs}" \
  --recipe_cmd "${recipe_cmd}" --verbose "${verbose}"

# plot_frontier EXP: BLEU against decoded tokens/s of EXP's benchmark (EXP/benchmark.json) in EXP/frontier.png;
# a benchmark it cannot read is said in one line and leaves stage 7 done.
plot_frontier() {
  if python3 "${tools_dir}/plot_frontier.py" "$1/benchmark.json" --out "$1/frontier.png"; then
    log "Speed/accuracy frontier: $1/frontier.png"
  else
    log "warning: no frontier plot for $1 (see the error above)"
  fi
}

if in_stage 7; then
  log "Stage 7: decoding speed of each experiment on ${gen_subset} (fairseq-accel-benchmark)"
  read -r -a bench_list <<< "${bench_configs}"
  for config in "${bench_list[@]}"; do
    exp="${exp_dir}/$(basename "${config}" .yaml)"
    stage_done "${exp}/.benchmark.done" "benchmark of ${exp}" && { cat "${exp}/BENCHMARK.md"; plot_frontier "${exp}"; continue; }
    require fairseq-accel-compress fairseq-accel-benchmark
    bin_dir="${data_dir}/bin_${bpe_type}${bpe_vocab_size}"
    float_checkpoint="${exp}/checkpoints/checkpoint_best.pt"
    # the int8 systems decode a calibrated int8 copy (under translation_accel: the model was trained under the
    # stock task, which would run it in float32); stock and fast run its weights in float32 and CTranslate2
    # converts the float checkpoint it was made from (--ct2-from)
    if ! stage_done "${exp}/int8/compressed.pt" "int8 copy of $(basename "${exp}")"; then
      run_logged "${exp}/int8/compress.log" -- fairseq-accel-compress --path "${float_checkpoint}" \
        --out "${exp}/int8/compressed.pt" --data "${bin_dir}" --calib-subset valid
    fi
    # shellcheck disable=SC2086  # ${bench_args} holds several arguments
    run_logged "${exp}/benchmark.log" --desc "benchmark $(basename "${exp}")" --unit round \
      --count 'round [0-9]+/[0-9]+, batch' --stdout "${exp}/BENCHMARK.md" -- \
      fairseq-accel-benchmark "${bin_dir}" --path "${exp}/int8/compressed.pt" --ct2-from "${float_checkpoint}" \
      --task translation_accel --gen-subset "${gen_subset}" --remove-bpe sentencepiece \
      --batch-sizes 1 32 --beam 5 --max-sentences "${bench_sentences}" --json "${exp}/benchmark.json" \
      ${bench_args}
    cat "${exp}/BENCHMARK.md"
    touch "${exp}/.benchmark.done"
    plot_frontier "${exp}"
  done
fi
