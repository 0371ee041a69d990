# eetool bundle: run on the board (device side) and on the edge server (tail side).
# Needs only: python3 -m pip install -r requirements/$(BOARD).txt
BOARD ?= host
PYTHON ?= python3
SERVER ?= 127.0.0.1:8470
PORT ?= 8470
ARGS ?=
# FORCE_BOARD=1: bench under BOARD even though this machine does not look like it
FORCE_BOARD ?=

.PHONY: install serve run bench
install:
	$(PYTHON) -m pip install -r requirements/$(BOARD).txt

serve:
	$(PYTHON) -m runtime serve . --host 127.0.0.1 --port $(PORT) $(ARGS)

run:
	$(PYTHON) -m runtime run . --server $(SERVER) --board $(BOARD) $(ARGS) samples/*

bench:
	$(PYTHON) -m runtime bench . --board $(BOARD) $(if $(FORCE_BOARD),--force-board) $(ARGS)
