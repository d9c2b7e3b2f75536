# The two README commands. Both build their own virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rollingq-installed

.PHONY: test demo bench clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 triton==3.6.0
	$(PY) -m pip install -q -e '.[test,plot,progress]'
	touch $(STAMP)

# Without a CUDA device the Triton kernels run through Triton's interpreter on the CPU.
test: $(STAMP)
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		echo "CUDA device found: kernels run on the GPU"; $(PY) -m pytest tests/ -q; \
	else \
		echo "no CUDA device: TRITON_INTERPRET=1"; TRITON_INTERPRET=1 $(PY) -m pytest tests/ -q; \
	fi

demo: $(STAMP)
	$(PY) -m rollingq.train --demo

bench: $(STAMP)
	$(PY) -m pytest bench/ -q

clean:
	rm -rf $(VENV) build *.egg-info runs .benchmarks
