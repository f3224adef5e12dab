# Two entry points (see README): `make demo` and `make test`.
# Both create or refresh .venv first; a second run reinstalls nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# --no-warn-conflicts: ve-fairseq declares torchaudio, which is left out on purpose (see FAIRSEQ_DEPS).
PIP_INSTALL := $(PY) -m pip --disable-pip-version-check -q install --no-warn-conflicts
# pip warns once per package about every configured index folder that does not exist (a pip.conf of the
# machine, not ours): dozens of lines that bury the install's real messages. Its exit status survives
# (pipefail).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
# Pinned CPU torch (a local wheel on these machines); nothing may resolve torch freely.
TORCH_VERSION := 2.13.0
# Official fairseq 0.12.2 does not import on Python 3.11; ve-fairseq ships cp311/cp312 wheels of the same
# code (module `fairseq`). Installed --no-deps so pip never pulls torchaudio (broken beside torch 2.13).
FAIRSEQ_DEPS := cffi cython "hydra-core>=1.3.2" omegaconf numpy regex sacrebleu tqdm bitarray \
                scikit-learn packaging sentencepiece jiwer kaldi-native-fbank soundfile editdistance
# The plugin's own needs (setup.py: install_requires and the [test], [gpu] and [bench] extras), installed
# with the pinned torch on the same command line so that nothing can swap it. cupy + NVRTC let the tests
# compile every CUDA kernel without a GPU; ctranslate2 is the speed peer in fairseq-accel-benchmark.
PLUGIN_DEPS  := pyyaml sacremoses pytest pytest-timeout pytest-xdist cupy-cuda12x nvidia-cuda-nvrtc-cu12 ctranslate2 matplotlib

.PHONY: all system-deps venv demo test clean
all: test

# espeak-ng synthesizes the mini ASR corpus (fairseq-accel-prepare espeak). Installed with apt-get when
# we are root and have apt-get; otherwise say how and go on (its tests are skipped without it).
system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && apt-get install -y espeak-ng; \
	else \
		echo "espeak-ng is missing (needed by fairseq-accel-prepare espeak): sudo apt-get install espeak-ng"; \
	fi
	@# German gettext catalogs for the mini NMT corpus (the tests need >= 20); each package ships some
	@if [ "$$(ls /usr/share/locale/de/LC_MESSAGES/*.mo 2>/dev/null | wc -l)" -lt 20 ]; then \
		packages="iso-codes libc-l10n postgresql-client git make wget binutils man-db procps"; \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update && apt-get install -y $$packages; \
		else \
			echo "fewer than 20 German gettext catalogs in /usr/share/locale/de/LC_MESSAGES: sudo apt-get install $$packages"; \
		fi; \
	fi

venv: system-deps $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile $(wildcard fairseq_accel/csrc/*.cpp fairseq_accel/csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) "torch==$(TORCH_VERSION)" $(PIP_QUIET)
	$(PIP_INSTALL) --no-deps "ve-fairseq==0.12.3" $(PIP_QUIET)
	$(PIP_INSTALL) "torch==$(TORCH_VERSION)" $(FAIRSEQ_DEPS) $(PLUGIN_DEPS) $(PIP_QUIET)
	$(PIP_INSTALL) --no-deps --no-build-isolation -e . $(PIP_QUIET)
	$(PY) -c "import fairseq_accel, torch; print('fairseq_accel ready, torch', torch.__version__)"
	touch $@

# The mini NMT recipe (LSRA vs transformer), the decoding benchmark on its transformer checkpoint, the
# int8-compressed LSRA model, then the mini ASR recipe (SAN-M vs s2t_transformer; its data stages run in the
# background on idle cores), quietly (one line per stage, progress bars; the full logs are in each recipe's
# data/ and exp/); then one summary: the NMT, decoding-speed, compression and ASR tables (egs/tools/demo.sh).
# `make demo DEMO_ARGS="--verbose true"` shows everything.
DEMO_NMT := egs/mini_l10n/nmt
DEMO_ASR := egs/mini_espeak/asr
demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash egs/tools/demo.sh $(DEMO_NMT) $(DEMO_ASR) $(DEMO_ARGS)

# Two pytest workers (pytest-xdist), each taking whole test files (module fixtures are built once): most tests
# wait on fairseq CLIs in subprocesses, so both cores of these machines stay busy. One OpenMP thread per process
# (workers and the CLIs they start): two 2-thread processes on 2 cores made a 250-update toy training take
# 286 s instead of ~20 s (CI of 2026-11-30; design.md §6 saw 30x on a decoding step).
test: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --durations 15 tests

clean:
	rm -rf $(VENV) build *.egg-info
