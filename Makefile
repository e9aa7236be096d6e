# Quick start: `make bench` (set up + run the default benchmark) and `make test` (set up + all tests).
PY ?= python3

.PHONY: setup bench test
setup:
	bash scripts/setup.sh
bench: setup
	$(PY) -m sparsekern.cli bench
test:
	bash scripts/test.sh
