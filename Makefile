# Two commands do all the set-up (see README.md):
#   make demo    install everything, then run the demo stack on the built-in piano corpus
#   make test    install everything, then run the test suite
PYTHON ?= python3
ARGS ?=
# DEMO=long: the long variant (every level trained longer, about an hour on 2 cores, full targets)
DEMO ?=

.PHONY: install demo test smoke bench
install:
	@PYTHON=$(PYTHON) bash scripts/install.sh

demo: install
	$(PYTHON) launch/demo.py $(if $(filter long,$(DEMO)),--long,) $(ARGS)

# The demo in miniature (a minute of piano, a few steps): what CI runs.
smoke: install
	$(PYTHON) launch/demo.py --smoke $(ARGS)

test: install
	$(PYTHON) -m pytest tests $(ARGS)

bench: install
	$(PYTHON) -m pip install -q --no-deps wavenet-vocoder==0.1.1
	$(PYTHON) bench/loader.py
	$(PYTHON) bench/sampling.py
	$(PYTHON) bench/codes.py
	$(PYTHON) bench/train.py
	$(PYTHON) bench/learn.py --minutes 10
