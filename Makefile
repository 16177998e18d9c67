# Two commands on a fresh machine: `make demo` (the whole job on the embedded corpus) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
# fairseq's own requirements, installed first: its torchaudio pin would pull another (multi-GB) torch
FAIRSEQ_DEPS := cffi cython hydra-core==1.3.2 omegaconf==2.3.0 regex bitarray scikit-learn tqdm
FAIRSEQ := fairseq-fixed==0.12.3.1
# Intel Neural Compressor for ONNX Runtime: its metadata pins numpy<2, so it goes in without its dependencies,
# then the packages it imports (transformers: onnx_model.py imports it at the top)
INC := onnx-neural-compressor==1.0
INC_DEPS := psutil py-cpuinfo pydantic prettytable transformers
# maintained implementations of survey mechanisms, compared with ours in the tests only
REFERENCE_PACKAGES := performer-pytorch==1.1.4 linformer==0.2.3 isab-pytorch==0.3.0 memory-compressed-attention==0.0.7 \
	reformer-pytorch==1.4.4 sinkhorn-transformer==0.11.4 routing-transformer==1.6.1
TEST_DEPS := pytest hypothesis pytest-xdist filelock $(REFERENCE_PACKAGES)
# test processes: each file on one worker (its module fixtures built once), the tiny trainings spread (tests/conftest.py)
TEST_WORKERS ?= 2
DEMO := runs/embedded

.PHONY: install demo test clean-demo arm64-check

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH) $(FAIRSEQ_DEPS) $(TEST_DEPS)
	$(BIN)/pip install --no-deps --no-build-isolation $(FAIRSEQ)
	$(BIN)/pip install -e .
	$(BIN)/pip install --no-deps $(INC)
	$(BIN)/pip install $(INC_DEPS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lite pipeline configs/pipelines/embedded.yaml --run-dir $(DEMO)
	echo "Ein kleiner Hund läuft über die Wiese." | $(BIN)/lite translate --backend onnx --model $(DEMO)/lsra/onnx/int8

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadscope tests

clean-demo:
	rm -rf $(DEMO)

# Not in CI: the int8 model (ORT format) on ARM64 under qemu against x86 (eval/arm64_check.py; needs Debian's
# qemu-user-static and debootstrap, and root). ARM64_MODEL=DIR checks another model dir.
ARM64_MODEL ?= $(DEMO)/lsra/onnx/int8
arm64-check: $(STAMP)
	$(BIN)/python -m eval.arm64_check $(ARM64_MODEL)
