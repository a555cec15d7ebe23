# Two commands on a fresh machine: `make demo` (tiny Falcon-H1 -> Megatron TP=2 -> HF, verified) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
H1 := $(VENV)/bin/h1bridge
STAMP := $(VENV)/.installed

.PHONY: demo test lint fuzz bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned so pip takes the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(H1) make-tiny demo/hf --preset tiny --force
	$(H1) hf-to-megatron demo/hf demo/megatron --tp 2 --force
	$(H1) inspect demo/megatron
	$(H1) megatron-to-hf demo/megatron demo/hf-roundtrip --force
	$(H1) verify demo/hf demo/hf-roundtrip
	$(H1) parity demo/hf demo/megatron

# The tests that run megatron-core's own code run again on the newest release (0.19.x: Python >= 3.12
# wheel, unpacked beside the venv by tools/mcore019.sh; its dist_checkpointing runs on 3.11).
MCORE_TESTS := tests/test_torch_dist.py tests/test_torch_dist_io.py tests/test_training_checkpoints.py \
	tests/test_megatron_targets.py tests/test_distcp_direct.py \
	tests/test_torchrun.py::test_reshard_to_torch_dist_two_writers_megatron_core_loads_it
MCORE019 := .mcore019/.version

$(MCORE019): tools/mcore019.sh $(STAMP)
	bash tools/mcore019.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) $(MCORE019) lint
	$(PY) -m pytest
	PYTHONPATH=$(CURDIR)/.mcore019:$(CURDIR) $(PY) -m pytest $(MCORE_TESTS)

# More hypothesis examples per input class than `make test` draws (tests/test_fuzz.py, default 12).
FUZZ_EXAMPLES ?= 200
fuzz: $(STAMP)
	H1BRIDGE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py

bench: $(STAMP)
	$(PY) bench/convert_bench.py --presets 0.5b,1.5b,3b

clean:
	rm -rf demo bench/out .mcore019
