# The two README commands. Both build their own virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rollingq-installed

.PHONY: test demo bench test-torch2.11 clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 triton==3.6.0
	$(PY) -m pip install -q -e '.[test,plot,progress]'
	touch $(STAMP)

# Without a CUDA device the Triton kernels run through Triton's interpreter on the CPU, one
# single-threaded Python process per core (pytest-xdist; the CI machines have 2).
XDIST ?= -n 2
test: $(STAMP)
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		echo "CUDA device found: kernels run on the GPU"; $(PY) -m pytest tests/ -q; \
	else \
		echo "no CUDA device: TRITON_INTERPRET=1"; TRITON_INTERPRET=1 $(PY) -m pytest tests/ -q $(XDIST); \
	fi

demo: $(STAMP)
	$(PY) -m rollingq.train --demo

bench: $(STAMP)
	$(PY) -m pytest bench/ -q

# The GPU machines run torch 2.11 on Python 3.12 whatever we pin: the suite on that pair, in a venv
# of its own (PyPI's torch 2.11 wheel is a CUDA build, about 5 GB with its libraries; the kernels
# run through the interpreter as in `test`). pyenv's shim may hide python3.12: look there first.
COMPAT_VENV ?= .venv-torch2.11
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
test-torch2.11:
	test -x $(COMPAT_VENV)/bin/python || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q torch==2.11.0 triton==3.6.0
	$(COMPAT_VENV)/bin/python -m pip install -q -e '.[test,plot,progress]'
	TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/python -m pytest tests/ -q $(XDIST)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info runs .benchmarks
