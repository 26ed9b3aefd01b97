# LesionSeg: `make test` and `make demo` set everything up in .venv on first use.
PYTHON     ?= python3
VENV       ?= .venv
# torch is installed first and pinned: on this project's machines 2.13.0 is a local CPU
# wheel; a bare "torch" requirement would pull the CUDA build. Override for a GPU box:
#   make test TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0
VPY        := $(VENV)/bin/python
STAMP      := $(VENV)/.lesionseg-installed
PYTEST_ARGS ?= -q

.PHONY: all test demo list clean-venv
all: test

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet "$(TORCH_SPEC)"
	$(VPY) -m pip install --quiet -e ".[test,slicer,onnx]"
	@touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

# The demo segments the shipped ISLES'22 DWI with demo/model/*.pt, then an IDRiD fundus
# photograph with L-Seg's shipped weights, read in place from FUNDUS (see demo/README.md).
FUNDUS     ?= ../shared/data/fundus-idrid20
demo: $(STAMP)
	@if [ -f demo/model/msenet-demo-isles-dwi.pt ]; then \
		$(VENV)/bin/lesionseg demo --out demo-output --fundus $(FUNDUS); \
	else \
		$(VENV)/bin/lesionseg list; \
		echo; echo "The demo weights (demo/model/msenet-demo-isles-dwi.pt) are not in this checkout yet."; \
		echo "Make them with: $(VPY) scripts/make_demo_model.py (CPU, about 30 minutes), then run make demo again."; \
	fi

list: $(STAMP)
	$(VENV)/bin/lesionseg list

clean-venv:
	rm -rf $(VENV)
