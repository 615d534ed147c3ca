# `make demo` and `make test` each create/reuse .venv and install what they need.
# torch is installed first, pinned, so pip never pulls the CUDA wheels.
PY      := .venv/bin/python
PYTHON3 ?= python3
TORCH   ?= torch==2.13.0
STAMP   := .venv/.installed
export PYTHON3

.PHONY: demo test venv sysdeps sysdeps-test clean

# sysdeps first: it brings python3-venv, and the compiler DeepSpeed needs. A .venv without a working pip (a
# failed or interrupted `python -m venv`) is made again.
$(STAMP): pyproject.toml | sysdeps
	@$(PYTHON3) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "$(PYTHON3) is Python " \
	  + sys.version.split()[0] + ": 3.11 or newer needed (make PYTHON3=python3.11 ...)")'
	$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON3) -m venv --clear .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dataprep,pretrain,finetune,mpi,dev]'
	touch $(STAMP)

venv: $(STAMP)

sysdeps:       # what the pipeline needs (no Slurm or Prometheus daemons on a login node)
	bash deploy/install_sysdeps.sh pipeline

sysdeps-test:  # and what the tests start on loopback: Open MPI, Slurm + munge, Prometheus
	bash deploy/install_sysdeps.sh

demo: sysdeps venv
	$(PY) -m pretrain.demo

test: sysdeps-test venv
	$(PY) -m pytest -q

clean:
	rm -rf .venv demo_out .pytest_cache
