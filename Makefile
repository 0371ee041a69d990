# eetool: split computing and early exiting for DNNs on edge boards.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
OUT     ?= out
BOARD   ?= host
PORT    ?= 8470
SPLIT   ?= blocks.5
PLAN_BOARD ?= rpi4
export OMP_NUM_THREADS ?= 2
# aarch64 root filesystem, wheels and venvs for board-check: outside the clone, reused across clones
export BOARD_CHECK_CACHE ?= /var/cache/eetool-board-check

.PHONY: install fashion-mnist demo test bench reference board-check clean

$(BIN)/eetool: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e '.[tflite,test,ray]'
	touch $@

install: $(BIN)/eetool

# Debian's dataset-fashion-mnist, which the tests and the reference model need: installed when running as
# root, else a stop with the command to run (scripts/fashion_mnist.sh; $$EETOOL_FASHION_MNIST: another folder).
fashion-mnist: install
	@bash scripts/fashion_mnist.sh $(BIN)/python

# The main job end to end on the embedded default: real EfficientNet-Lite0, real images.
demo: install
	bash scripts/demo.sh $(OUT) $(SPLIT) $(BOARD) $(PORT)

test: install fashion-mnist
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not board" tests

# BOARD must be this machine (checked before any work; FORCE_BOARD=1 to override the detection);
# PLAN_BOARD is planned for from this machine's measurements.
bench: install
	bash scripts/bench.sh $(OUT) $(BOARD) $(PLAN_BOARD) $(if $(FORCE_BOARD),--force-board)

# Fashion-MNIST reference CNN with two trained exits.
reference: install fashion-mnist
	$(BIN)/python -m toolkit.train_reference --out $(OUT)/fashion-reference

# The bundle's board side on real aarch64 binaries under qemu-user (root; docs/board-check.md).
# BOARD=rpi4|rpi5; BUNDLE=dir (without it: wheels + smoke test only). Cache: $$BOARD_CHECK_CACHE.
board-check: install
	bash scripts/board_check.sh --board $(if $(filter host,$(BOARD)),rpi4,$(BOARD)) $(if $(BUNDLE),--bundle $(BUNDLE))

clean:
	rm -rf $(OUT) .pytest_cache
