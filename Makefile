# mlaas4hep: `make run` sets up and runs the demo pipeline; `make test` sets up and tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint format down docs clean k8s-validate grpc-protos

OIDC_PROVIDER := tests/oidc/node_modules/.package-lock.json
# The installer of the venv's packages (the pins of pyproject.toml): uv, about half of pip's
# time. --compile-bytecode writes the .pyc files pip writes: without them every sandboxed
# model.py (read-only venv, PYTHONDONTWRITEBYTECODE) and fresh interpreter compiles its imports.
UV := uv==0.9.7

setup: $(STAMP) $(OIDC_PROVIDER)

# The real OIDC provider of the integration tests (npm oidc-provider, pinned in tests/oidc).
$(OIDC_PROVIDER): tests/oidc/package.json tests/oidc/package-lock.json
	cd tests/oidc && npm ci --no-audit --no-fund

$(STAMP): pyproject.toml scripts/install-system-packages.sh
	bash scripts/install-system-packages.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(UV)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode -e '.[test]'
	touch $@

## run: start the embedded platform and run the demo pipeline over HTTP
run: setup
	$(BIN)/mlaas4hep up
	$(BIN)/mlaas4hep demo

## test: lint, validate the Kubernetes manifests, then the whole test suite
test: setup lint k8s-validate
	$(BIN)/python -m pytest

## k8s-validate: build every k8s/ overlay; check each object against the KubeRay CRDs
## (../shared/kuberay-crds), the core Kubernetes schemas and the package's import paths
k8s-validate: setup
	$(BIN)/python -m mlaas4hep.platform.k8s k8s ../shared/kuberay-crds

lint: setup
	$(BIN)/ruff check mlaas4hep tests benchmarks
	$(BIN)/ruff format --check mlaas4hep tests benchmarks

format: setup
	$(BIN)/ruff format mlaas4hep tests benchmarks
	$(BIN)/ruff check --fix mlaas4hep tests benchmarks

## grpc-protos: regenerate mlaas4hep/serve/protocols/grpc_predict_v2_pb2*.py from the .proto beside
## them with grpcio-tools (in a throwaway venv); the messages go into a private descriptor
## pool, as tritonclient defines the same `inference.*` names in the default one
GRPC_TOOLS := grpcio-tools==1.85.1
PROTOC_VENV := /tmp/mlaas4hep-protoc
grpc-protos:
	test -x $(PROTOC_VENV)/bin/python || $(PYTHON) -m venv $(PROTOC_VENV)
	$(PROTOC_VENV)/bin/pip install --quiet $(GRPC_TOOLS)
	$(PROTOC_VENV)/bin/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
		mlaas4hep/serve/protocols/grpc_predict_v2.proto
	sed -i -e 's/_descriptor_pool.Default().AddSerializedFile(/_POOL.AddSerializedFile(/' \
		-e 's/^_sym_db = .*/&\n_POOL = _descriptor_pool.DescriptorPool()  # private pool/' \
		mlaas4hep/serve/protocols/grpc_predict_v2_pb2.py
	$(BIN)/python -c 'import tritonclient.grpc, mlaas4hep.serve.protocols.grpc_predict_v2_pb2_grpc'

## down: stop the embedded platform
down: setup
	$(BIN)/mlaas4hep down

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
