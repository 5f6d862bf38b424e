# finetune-operator: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV_BIN = $(shell scripts/venv.sh)
PY = $(VENV_BIN)/python
PYTEST_ARGS ?=

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

.PHONY: venv
venv: ## Create/refresh the virtual environment (outside the repo) with the trainer and dev extras
	@scripts/venv.sh >/dev/null

.PHONY: testbin
testbin: ## Build the real test servers (kube-apiserver, etcd, kwok, training operator, MinIO) into ~/.cache
	bash tests/testbin/build.sh

.PHONY: test
test: venv testbin lint ## Lint, then run the whole test suite (the README's test command; CI runs it with FTJ_REQUIRE_REAL=1)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here" >&2; fi; exit $$rc

.PHONY: test-unit
test-unit: venv ## Run only the pure unit tests (no servers, no torch training)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: venv testbin ## Run only the e2e tier: FineTuneJobs that really train, driven with kubectl (see docs/testing.md)
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

.PHONY: lint
lint: venv ## ruff lint + format check, mypy, import layers (import-linter)
	$(VENV_BIN)/ruff check .
	$(VENV_BIN)/ruff format --check .
	$(VENV_BIN)/mypy operator/finetune_operator trainer-image/finetune_trainer
	$(VENV_BIN)/lint-imports

.PHONY: format
format: venv ## Apply ruff formatting and safe fixes
	$(VENV_BIN)/ruff check --fix .
	$(VENV_BIN)/ruff format .

.PHONY: crds
crds: venv ## Regenerate crds/ (and docs/api.md) from the API models
	$(VENV_BIN)/ftj crd -o crds/finetune.dev_finetunejobs.yaml
	cp crds/finetune.dev_finetunejobs.yaml helm/finetune-operator/crds/
	$(VENV_BIN)/ftj docs -o docs/api.md

.PHONY: quickstart
quickstart: venv ## The README's main job: make a tiny model + data, then LoRA fine-tune it locally with `ftj run`
	$(PY) examples/quickstart/make_quickstart.py out/quickstart
	$(VENV_BIN)/ftj run out/quickstart/finetunejob.yaml --workdir out/quickstart/.ftj

.PHONY: golden
golden: venv ## Regenerate the rendered-manifest golden files (review the diff)
	FTJ_UPDATE_GOLDEN=1 $(PY) -m pytest -q tests/unit/test_render.py -k golden

.PHONY: pins
pins: venv ## Regenerate the container images' pinned requirements from pyproject + the tested venv
	$(PY) tests/images/pins.py

.PHONY: image-requirements
image-requirements: venv ## Install each image's requirements into a clean venv and import them (~6 min)
	FTJ_TEST_IMAGE_REQUIREMENTS=1 $(PY) -m pytest tests/images/test_image_requirements.py $(PYTEST_ARGS)

.PHONY: lf-reference
lf-reference: venv ## Regenerate tests/parity/lf_reference.json.gz and data/lf_templates.py with LLaMA-Factory itself (own venv)
	LLAMAFACTORY_VERBOSITY=WARN $$(tests/parity/lf_venv.sh) tests/parity/generate.py
	$(VENV_BIN)/ruff format trainer-image/finetune_trainer/data/lf_templates.py
