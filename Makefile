# Two commands a newcomer runs on a fresh machine; each sets itself up first.
#   make test   everything CI checks: ruff and mypy, the test suite (Triton kernels under the
#               interpreter on CPU tensors), the ahead-of-time compile of every kernel the GPU
#               lease launches, and a dry run of the lease command
#   make demo   DINO trained for real on the digits scikit-learn ships (a few minutes on a CPU),
#               then k-NN of the trained teacher against the same network at random init
#   make bench  the benchmark comparison, printed as a table (small shapes without a GPU)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: test demo bench lint pytest aot lease-dry-run clean

# Re-installed when the build inputs change (the editable install compiles csrc/ into fastssl._C).
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q setuptools wheel ninja
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,train]"
	touch $@

# ruff over everything; mypy over the trainer (fastssl/train, see pyproject.toml): a wrong config name fails here.
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy

pytest: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# A fresh Triton cache, so every kernel is really compiled (not read back from a cache); then the
# CUDA kernels of csrc/, whose registers and spills ptxas reports (a spill fails, as for Triton).
aot: $(VENV)/.installed
	@cache=$$(mktemp -d); TRITON_CACHE_DIR=$$cache $(PY) -m fastssl.kernels.aot --arch 80 90; \
	rc=$$?; rm -rf $$cache; exit $$rc
	$(PY) -m fastssl._cuda_resources --arch 80 90

# The GPU lease command walked on the CPU (benchmarks/lease.py --dry-run): every stage with the same
# budgeting, the kernels under the interpreter, the benchmarks' smoke presets; its files go to a
# throwaway folder.
lease-dry-run: $(VENV)/.installed
	@out=$$(mktemp -d); $(PY) -m benchmarks.lease --dry-run --out $$out; rc=$$?; cat $$out/lease.md; \
	rm -rf $$out; exit $$rc

test: lint pytest aot lease-dry-run

demo: $(VENV)/.installed
	$(PY) -m fastssl.train demo

bench: $(VENV)/.installed
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
