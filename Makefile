# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates .venv and installs what is missing by itself (a cold install takes ~5 minutes).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Quiet settings for the embedded tools (see docs/design.md) in the l2rclip commands and DVC stages; the
# Prefect flows set these and Prefect's own by themselves (pipelines/settings.py). Tests force
# HF_HUB_OFFLINE=1 themselves; `make demo` may download CLIP weights where a network is available.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1

.PHONY: demo methods fgnet fgnet-reference fgnet-methods reproduce test test-all test-slow lint install clean ui serve flows docs

# constraints.txt: the exact tested versions (pyproject.toml has lower bounds; .ci/freeze-constraints writes it)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## demo: the main job: the DVC pipeline on the embedded demo set, tracked in MLflow
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/l2rclip demo

## methods: the method study (studies/methods/dvc.yaml, a DVC pipeline of its own): every method on a shifted demo
## task with the demo CLIP, by shots and under label shift, over 3 seeds; table and figures in studies/methods/report
## (about 20 minutes on 2 CPU cores; docs/demo-clip.md)
methods: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro studies/methods/dvc.yaml

## fgnet: 5 subject-grouped folds on FG-NET (ages 0..69) as a DVC experiment (needs ../shared/data/fgnet)
FGNET ?= ../shared/data/fgnet
FGNET_SET = -S data.source=fgnet -S data.root=$(FGNET) -S ranks.start=0 -S ranks.stop=69 \
	-S split.missing_ranks=warn -S eval.cs_theta=5 -S tracking.experiment=l2rclip-fgnet \
	-S 'model.prompt.context_init=a photo of a person aged' \
	-S "model.prompt_template='a photo of a {} year old person.'"
fgnet: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run --name fgnet-5fold $(FGNET_SET)

## fgnet-reference: the same with every definition the authors' code fixes (l2rclip/parity.py)
fgnet-reference: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run --name fgnet-5fold-reference $(FGNET_SET) \
	  $$($(BIN)/l2rclip parity reference)

## fgnet-methods: every method on FG-NET with the same backbone, budget and seed, then the results table (docs/results.md)
METHODS = l2rclip ordinalclip coop zero_shot linear_probe coral corn
FGNET_EPOCHS ?= 15
fgnet-methods: $(STAMP)
	for method in $(METHODS); do \
	  PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run --name fgnet-m-$$method $(FGNET_SET) \
	    -S model.method=$$method -S train.epochs=$(FGNET_EPOCHS) -S model.fallback.epochs=$(FGNET_EPOCHS) || exit 1; \
	done
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/l2rclip results --prefix fgnet-m- --readme docs/results.md --marker fgnet

## reproduce: a published protocol as a DVC experiment, e.g. `make reproduce PROTOCOL=morph-a DATA=/data/morph`
## (presets in protocols/; LISTS: the authors' split lists; reduced budget: EPOCHS=1 FOLDS=0,1,2)
PROTOCOL ?=
DATA ?=
LISTS ?= ../shared/data/l2rclip-datalists
EPOCHS ?=
FOLDS ?=
reproduce: $(STAMP)
	@test -n "$(PROTOCOL)" -a -n "$(DATA)" || { echo "usage: make reproduce PROTOCOL=<$$(ls protocols | sed 's/.yaml//' | paste -sd'|')> DATA=/path/to/images [EPOCHS=1] [FOLDS=0,1]"; exit 2; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/l2rclip reproduce $(PROTOCOL) --data $(DATA) --lists $(LISTS) \
	  $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(FOLDS),--folds $(FOLDS))

## plots: learning curves (every fold's history.csv) and evaluation plots as an HTML page that opens
## offline (dvc_plots/index.html); REVS="exp-a exp-b" compares experiments (`dvc plots diff`)
REVS ?=
.PHONY: plots plots-vendor
plots: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m l2rclip.evaluation.offline_plots check
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc plots $(if $(REVS),diff $(REVS),show)

## plots-vendor: download the vega libraries pinned in vega/vega-lock.json from npm, verify, rebuild the page
plots-vendor: $(STAMP)
	$(BIN)/python -m l2rclip.evaluation.offline_plots build

## ui: the MLflow UI on the project's store (mlflow.db) at http://127.0.0.1:5000 (Ctrl+C stops it)
ui: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --host 127.0.0.1 --port 5000

## serve: the registered champion over REST at http://127.0.0.1:5001/invocations (MODEL=models:/<name>/<version>
## for another; PORT=...); `l2rclip serve` puts .venv/bin on PATH, where mlflow models serve finds uvicorn
MODEL ?=
PORT ?= 5001
serve: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/l2rclip serve $(MODEL) --port $(PORT)

## flows: a local Prefect server with its UI at http://127.0.0.1:4200 (Ctrl+C stops it), for the flows in
## pipelines/ to report to and for schedules; start them from another terminal (docs/mlops.md)
flows: $(STAMP)
	@echo "then, in another terminal: export PREFECT_API_URL=http://127.0.0.1:4200/api and run e.g."
	@echo "  .venv/bin/python -m pipelines.pipeline   or   .venv/bin/python -m pipelines.deploy --cron '0 3 * * *'"
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/prefect server start --host 127.0.0.1 --port 4200

## test: the default (fast, offline) test suite
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10

## test-all: include slow tests (everything but `gpu`): the default tier and the slow one in one run
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" --durations=10

## test-slow: the slow tier alone (what `make test-all` adds to `make test`; CI runs it after `make test`)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not gpu" --durations=10

## docs: the documentation site (mkdocs.yml, pages in docs/) into site/, offline; any warning fails it
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

## lint: ruff (checks and formatting), mypy on the library (strictness stated in pyproject.toml), and the
## layers contract of pyproject.toml (no module imports a higher layer)
lint: $(STAMP)
	$(BIN)/ruff check l2rclip tests benchmarks pipelines
	$(BIN)/ruff format --check l2rclip tests benchmarks pipelines
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache site
