#!/usr/bin/env bash
# The step_buffers commands (run.sh short|all FLOAT_CKPT COMPRESSED_CKPT NMT_DATA RUN) after log_softmax_topk stopped
# storing the log-probabilities (2026-12-01, late session); the tables and logs go here.
here=$(cd "$(dirname "$0")" && pwd)
RESULTS_DIR=${here} exec bash "${here}/../2026-12-01_step_buffers/run.sh" "$@"
