# `make demo` and `make test` each create/reuse .venv and install what they need.
# torch is installed first, pinned, so pip never pulls the CUDA wheels.
PY      := .venv/bin/python
TORCH   ?= torch==2.13.0
STAMP   := .venv/.installed

.PHONY: demo test venv sysdeps clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dataprep,pretrain,finetune,mpi,dev]'
	touch $(STAMP)

venv: $(STAMP)

sysdeps:
	bash deploy/install_sysdeps.sh

demo: venv sysdeps
	$(PY) -m pretrain.demo

test: venv sysdeps
	$(PY) -m pytest -q

clean:
	rm -rf .venv demo_out .pytest_cache
