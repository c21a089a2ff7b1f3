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
# the launchers' plans and the launches recorded while the code really ran; registers, spills, shared
# memory; fails on a compile error, a spill, or a recorded launch that no plan makes (drift)
# (bench/gpu_compile_check.py, docs/kernels.md).
#   make gpu-compile-check                           with the environment's triton
#   make gpu-compile-check TRITON_SPEC=triton==3.6.0  in an environment of its own with that triton
#                                                    (3.6.0 is the GPU machine's)
TRITON_SPEC ?=
COMPILE_VENV := .venv-$(subst ==,-,$(TRITON_SPEC))
LAUNCHES := build/launches/recorded.jsonl
gpu-compile-check: $(if $(strip $(TRITON_SPEC)),$(COMPILE_VENV)/.installed,$(VENV)/.installed) $(LAUNCHES)
ifeq ($(strip $(TRITON_SPEC)),)
	env -u TRITON_INTERPRET $(PY) bench/gpu_compile_check.py --recorded $(LAUNCHES)
else
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(COMPILE_VENV)/bin/python bench/gpu_compile_check.py \
		--recorded $(LAUNCHES)
endif

# What the GPU suite and the engine launch, recorded under the interpreter (bench/record_launches.py, about
# 5 minutes on 2 cores): made again when the package, a kernel, a benchmark, a test or the golden model changes.
$(LAUNCHES): $(VENV)/.installed bench/record_launches.py bench/gpu_kernels.py bench/gpu_suite \
		$(wildcard kernels/*.py diffutron_engine/*.py diffutron_engine/*/*.py tests/*.py tests/*/*.py tests/data/golden/*/*/*)
	mkdir -p $(dir $@)
	HF_HUB_OFFLINE=1 $(PY) bench/record_launches.py --out $@

# the check needs torch (CPU), numpy and the chosen triton; the package runs from the source tree
$(COMPILE_VENV)/.installed:
	test -x $(COMPILE_VENV)/bin/python || $(PYTHON) -m venv $(COMPILE_VENV)
	$(COMPILE_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPILE_VENV)/bin/python -c "import torch" 2>/dev/null || $(COMPILE_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(COMPILE_VENV)/bin/python -m pip install -q numpy "$(TRITON_SPEC)"
	touch $@

# A rehearsal of the GPU machine without a GPU: bench/gpu_suite --quick (kernels in Triton's interpreter
# on CPU) in an environment with that machine's versions and, as there, none of the optional packages
# (no fastapi, uvicorn, openai, lm_eval, datasets, peft: the tests that need them skip); the package runs
# from the source tree. Every Triton launch the suite makes is recorded, then compiled for the GPUs
# together with the launchers' plans (bench/gpu_compile_check.py --recorded fails on drift).
#   make gpu-rehearsal                              finds python3.12 on PATH, else pyenv's
#   make gpu-rehearsal PYTHON312=/path/to/python3.12
# torch 2.11.0 from PyPI is a CUDA build: the first run fetches about 3.5 GB of wheels.
.PHONY: gpu-rehearsal
REHEARSAL_VENV := .venv-gpu-rehearsal
REHEARSAL_PY := $(REHEARSAL_VENV)/bin/python
REHEARSAL_OUT := build/gpu-rehearsal
REHEARSAL_PINS := torch==2.11.0 triton==3.6.0 transformers==5.17.0 tokenizers==0.23.2 numpy==2.5.*
REHEARSAL_ABSENT := fastapi uvicorn openai lm_eval datasets peft
PYTHON312 ?=

gpu-rehearsal: $(REHEARSAL_VENV)/.installed
	$(REHEARSAL_PY) -c "$$REHEARSAL_CHECK" $(foreach p,$(REHEARSAL_PINS),'$(p)') -- $(REHEARSAL_ABSENT)
	rm -rf $(REHEARSAL_OUT) && mkdir -p $(REHEARSAL_OUT)
	HF_HUB_OFFLINE=1 DIFFUTRON_RECORD_LAUNCHES=$(CURDIR)/$(REHEARSAL_OUT)/rehearsal-launches.jsonl \
		PYTHONPATH=$(CURDIR) $(REHEARSAL_PY) bench/gpu_suite --quick --out $(REHEARSAL_OUT)
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(REHEARSAL_PY) bench/gpu_compile_check.py \
		--recorded $(REHEARSAL_OUT)/rehearsal-launches.jsonl

# Only what the package needs besides the pinned versions (safetensors; pybind11 and setuptools to build
# the C++ extension, which the suite's build step requires) and pytest. A venv left by another Python is
# rebuilt; the stamp is written only once the versions are the ones asked for.
$(REHEARSAL_VENV)/.installed: Makefile
	@if ! $(REHEARSAL_PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then \
		py="$(PYTHON312)"; \
		if [ -z "$$py" ]; then \
			for c in python3.12 "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do \
				if "$$c" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then \
					py="$$c"; break; fi; \
			done; \
		fi; \
		if [ -z "$$py" ]; then \
			echo "error: no Python 3.12 found (python3.12 on PATH or under pyenv's versions/);" \
				"give one: make gpu-rehearsal PYTHON312=/path/to/python3.12" >&2; exit 1; fi; \
		echo "$$py -m venv --clear $(REHEARSAL_VENV)"; "$$py" -m venv --clear $(REHEARSAL_VENV); \
	fi
	$(REHEARSAL_PY) -m pip install -q --upgrade pip
	$(REHEARSAL_PY) -m pip install -q $(foreach p,$(REHEARSAL_PINS),'$(p)') safetensors pybind11 setuptools pytest
	$(REHEARSAL_PY) -c "$$REHEARSAL_CHECK" $(foreach p,$(REHEARSAL_PINS),'$(p)') -- $(REHEARSAL_ABSENT)
	touch $@

# argv: name==version pins (fnmatch patterns), then --, then modules that must not be importable
define REHEARSAL_CHECK
import fnmatch, importlib.metadata as md, importlib.util, sys
i = sys.argv.index("--")
bad = [] if sys.version_info[:2] == (3, 12) else [f"python {sys.version.split()[0]} (wanted 3.12)"]
for pin in sys.argv[1:i]:
    name, want = pin.split("==")
    try:
        got = md.version(name)
    except md.PackageNotFoundError:
        got = "missing"
    if not fnmatch.fnmatch(got, want):
        bad.append(f"{name} {got} (wanted {want})")
bad += [f"{m} installed (the GPU machine has none)" for m in sys.argv[i + 1:] if importlib.util.find_spec(m)]
sys.exit("error: the rehearsal environment differs from the GPU machine: " + "; ".join(bad) if bad else 0)
endef
export REHEARSAL_CHECK

clean:
	rm -rf $(VENV) .venv-triton-* $(REHEARSAL_VENV) build *.egg-info diffutron_engine/_C*.so
