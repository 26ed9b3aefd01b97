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
	$(VPY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/lesionseg list

list: $(STAMP)
	$(VENV)/bin/lesionseg list

clean-venv:
	rm -rf $(VENV)
