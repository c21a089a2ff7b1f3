# The two commands of the README:
#   make demo   set up the environment and generate offline with a locally built model
#   make test   set up the environment (with test extras) and run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, on its own, so that the package's `torch>=2.4` is already satisfied and pip
# never picks a multi-GB CUDA build on a CPU-only machine. Override for a GPU machine, e.g.
#   make test TORCH_SPEC=torch==2.11.0
TORCH_SPEC ?= torch==2.13.0
DEMO_MODEL ?= demo-model

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

$(DEMO_MODEL)/config.json: | $(VENV)/.installed
	@echo "NOTE: no trained demo model ships yet: building a small RANDOM-WEIGHT checkpoint in $(DEMO_MODEL)/."
	@echo "      Its answers are token soup; the point is the pipeline. Use --model for a real checkpoint."
	HF_HUB_OFFLINE=1 $(PY) -m diffutron_engine.random_model $(DEMO_MODEL) --size small

demo: $(VENV)/.installed $(DEMO_MODEL)/config.json
	HF_HUB_OFFLINE=1 $(VENV)/bin/diffutron-engine env
	HF_HUB_OFFLINE=1 $(VENV)/bin/diffutron-engine generate --model $(DEMO_MODEL) --json --seed 0 --preset diffutron-long \
		--max-new-tokens 32 --steps 32 --block-size 16 \
		"Türkiye'nin başkenti neresidir?" "Bana kısa bir şiir yaz."

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_MODEL) build *.egg-info diffutron_engine/_C*.so
