#!/usr/bin/env bash
# The summary at the end of `make demo`: the tables the two mini recipes wrote, one after the other.
#
#   egs/tools/demo_summary.sh [NMT_RECIPE_DIR [ASR_RECIPE_DIR]]
#
# Prints the translation table (<NMT>/exp/RESULTS.md, stage 6 of egs/mini_l10n/nmt/run.sh), the
# decoding-speed table of each benchmarked experiment (<NMT>/exp/<config>/BENCHMARK.md, stage 7), the
# compression table (<NMT>/exp/COMPRESSION.md, stage 10) and the speech recognition table
# (<ASR>/exp/RESULTS.md, stage 5 of egs/mini_espeak/asr/run.sh). Exits 1, naming the missing files, unless
# all of them exist.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
nmt_dir=${1:-${repo_root}/egs/mini_l10n/nmt}
asr_dir=${2:-${repo_root}/egs/mini_espeak/asr}
missing=0

# table TITLE FILE: TITLE, FILE's path and FILE, or a note that FILE is missing.
table() {
  echo
  echo "## $1 (${2#"${repo_root}/"})"
  if [ -f "$2" ]; then
    cat "$2"
  else
    echo "(not found: run the recipe's stages first)"
    missing=1
  fi
}

echo
echo "==================== make demo: summary ===================="
table "Translation, de->en gettext messages" "${nmt_dir}/exp/RESULTS.md"
shopt -s nullglob
benchmarks=("${nmt_dir}"/exp/*/BENCHMARK.md)
if [ ${#benchmarks[@]} -eq 0 ]; then
  benchmarks=("${nmt_dir}/exp/<config>/BENCHMARK.md")
fi
for benchmark in "${benchmarks[@]}"; do
  table "Decoding speed, $(basename "$(dirname "${benchmark}")")" "${benchmark}"
done
table "Compression after training: int8 weights and activations, decoded in int8" "${nmt_dir}/exp/COMPRESSION.md"
table "Speech recognition, espeak-ng English" "${asr_dir}/exp/RESULTS.md"
exit "${missing}"
