# The two commands of the README:
#   make demo   set up the environment and generate offline with the bundled Turkish demo model
#   make test   set up the environment (with test extras) and run the whole suite
# and, to rebuild the bundled model from scratch (about 45 minutes on 2 CPU cores):
#   make tiny-tr
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, on its own, so that the package's `torch>=2.4` is already satisfied and pip
# never picks a multi-GB CUDA build on a CPU-only machine. Override for a GPU machine, e.g.
#   make test TORCH_SPEC=torch==2.11.0
TORCH_SPEC ?= torch==2.13.0
TINY_TR := diffutron_engine/models/tiny-tr

.PHONY: demo test test-fast venv clean tiny-tr gpu-compile-check

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# The demo model: 3.8M parameters trained on Turkish LibreOffice help text (training/data/README.md).
# It writes Turkish in the style of those pages; it is not an assistant.
demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/diffutron-engine env
	HF_HUB_OFFLINE=1 $(VENV)/bin/diffutron-engine generate --model tiny-tr --no-chat --json --seed 0 \
		--max-new-tokens 24 --steps 24 --block-size 24 --temperature 0.7 --repetition-penalty 1.3 \
		"Seçili hücrelerin" "Belgeyi PDF olarak" "Bu işlev"

# Rebuild the bundled model: corpus (Debian's libreoffice-help-tr), tokenizer + initial weights, the
# exact training run, held-out evaluation, then install into the package folder.
tiny-tr: $(VENV)/.installed
	$(PY) -m diffutron_engine.training.data.prepare_tr --out training/data/tr
	rm -rf runs/tiny-tr-init runs/tiny-tr
	$(PY) -m diffutron_engine.training.tiny_tr init --out runs/tiny-tr-init
	HF_HUB_OFFLINE=1 $(VENV)/bin/diffutron-engine train cpt --preset tiny-tr --model runs/tiny-tr-init \
		--data training/data/tr/train.txt --eval-data training/data/tr/heldout.txt \
		--output-dir runs/tiny-tr --max-steps 4500 --log-every 50
	HF_HUB_OFFLINE=1 $(VENV)/bin/diffutron-engine train cpt --preset tiny-tr --model runs/tiny-tr/final \
		--data training/data/tr/train.txt --eval-data training/data/tr/heldout.txt \
		--output-dir runs/tiny-tr-2 --max-steps 5000 --lr 1.5e-3 --seed 1 --log-every 50
	rm -rf $(TINY_TR).tmp && cp -r runs/tiny-tr-2/final $(TINY_TR).tmp && rm -rf $(TINY_TR) && mv $(TINY_TR).tmp $(TINY_TR)
	HF_HUB_OFFLINE=1 $(VENV)/bin/diffutron-engine eval perplexity --model tiny-tr --data training/data/tr/heldout.txt --json

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The suite without the tests marked slow (multi-process training, the Triton-interpreter engine run,
# the GPU suite's self-test, end-to-end benchmarks): for quick iterations; `make test` runs everything.
test-fast: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# Every Triton kernel compiled for sm_80, sm_90 and sm_100 without a GPU (ptxas from the triton wheel):
# registers, spills, shared memory; fails on a compile error or a spill (bench/gpu_compile_check.py).
#   make gpu-compile-check                           with the environment's triton
#   make gpu-compile-check TRITON_SPEC=triton==3.6.0  in an environment of its own with that triton
#                                                    (3.6.0 is the GPU machine's)
TRITON_SPEC ?=
COMPILE_VENV := .venv-$(subst ==,-,$(TRITON_SPEC))
gpu-compile-check: $(if $(strip $(TRITON_SPEC)),$(COMPILE_VENV)/.installed,$(VENV)/.installed)
ifeq ($(strip $(TRITON_SPEC)),)
	env -u TRITON_INTERPRET $(PY) bench/gpu_compile_check.py
else
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(COMPILE_VENV)/bin/python bench/gpu_compile_check.py
endif

# the check needs torch (CPU), numpy and the chosen triton; the package runs from the source tree
$(COMPILE_VENV)/.installed:
	test -x $(COMPILE_VENV)/bin/python || $(PYTHON) -m venv $(COMPILE_VENV)
	$(COMPILE_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPILE_VENV)/bin/python -c "import torch" 2>/dev/null || $(COMPILE_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(COMPILE_VENV)/bin/python -m pip install -q numpy "$(TRITON_SPEC)"
	touch $@

clean:
	rm -rf $(VENV) .venv-triton-* build *.egg-info diffutron_engine/_C*.so
