# Two commands do all set-up:  `make demo`  and  `make test`.
# Everything installs into $(VENV) (a virtual environment) from requirements/$(EXTRA).txt;
# a stamp keyed on the requirements file and this Makefile makes a second run skip pip entirely.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
EXTRA ?= cpu
VENV ?= .venv
PY := $(VENV)/bin/python
REQ := requirements/$(EXTRA).txt
STAMP := $(VENV)/.installed-$(EXTRA)-$(shell cat $(REQ) $(firstword $(MAKEFILE_LIST)) | sha1sum | cut -c1-12)
PYTEST_ARGS ?= -m "not long"

.PHONY: setup demo test test-long bench clean prometheus
setup: $(STAMP)

$(STAMP): $(REQ)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# pip compiles every installed file on one core; compileall below uses both (~20 s less here)
	$(PY) -m pip install --disable-pip-version-check -q --no-compile -r $(REQ)
	@# on CPU: torchvision, torchaudio and torchcodec break `import transformers` against the CPU torch;
	@# triton (xgrammar's GPU kernels) has no use there, and present, every process of the demo (and
	@# the demo itself) printed a "nanobind: leaked ..." report of ~27 lines as it exited
	@if [ "$(EXTRA)" = "cpu" ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true; fi
	@# scikit-learn comes with the packaged encoder's sentence-transformers, which scout never imports;
	@# transformers imports it at start when present (~1-2 s of every role's start-up)
	@$(PY) -m pip uninstall -y -q scikit-learn 2>/dev/null || true
	@$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') >/dev/null || true
	@command -v promtool >/dev/null || $(MAKE) --no-print-directory prometheus
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# Debian's prometheus server + promtool, used by the deployment tests (skipped without them).
prometheus:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1; } || \
	  echo "note: could not install Debian's prometheus package; the Prometheus tests will be skipped"; \
	else echo "note: run 'sudo apt-get install prometheus' for the Prometheus tests"; fi

demo: setup
	$(PY) cli.py demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-long: setup  # the minutes-long fault, fuzz and pipeline scenarios (kept out of CI's time budget)
	$(PY) -m pytest -m long

bench: setup
	$(PY) bench/protocol_bench.py

clean:
	rm -rf $(VENV) .scout .pytest_cache .hypothesis
