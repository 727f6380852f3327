# The two commands a newcomer needs (both set everything up first):
#   make repro   run the DVC pipeline (dvc repro)
#   make test    lint, format check, and the whole test suite
.PHONY: setup repro test lint docs docs-figures bench bench-models bench-train bench-serve bench-tracking lock

setup:
	@scripts/setup.sh

repro: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" dvc repro

# ruff; the layers contract (pyproject.toml's [tool.importlinter]); every DVC stage's deps
# cover the code it runs (tests/stage_code.py); the documentation builds without a warning.
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports
	.venv/bin/python tests/stage_code.py --check
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

# The documentation site (mkdocs.yml, docs/) into site/; trains nothing.
docs: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

# docs/figures/*.png from a real run's outputs: after `make repro` (and a study).
docs-figures: setup
	.venv/bin/python scripts/docs_figures.py

# Two or more workers (one per core): the end-to-end tests spend much of their time starting
# interpreters and servers and waiting on them, which overlaps well.
test: lint
	.venv/bin/pytest -n auto --dist worksteal --durations=25

bench: setup
	.venv/bin/python benchmarks/loader.py

bench-models: setup
	.venv/bin/python benchmarks/models.py

bench-train: setup
	.venv/bin/python benchmarks/train.py

bench-serve: setup
	.venv/bin/python benchmarks/serve.py

# SQLite against the team stack (ran-cli stack); the outage run needs data/ingest (make repro).
bench-tracking: setup
	.venv/bin/python benchmarks/tracking.py

# Re-pin requirements.lock from the current .venv (after changing pyproject.toml).
lock:
	{ echo "# Exact versions for .venv (scripts/setup.sh installs them). Regenerate: make lock"; \
	  .venv/bin/pip freeze --exclude-editable; } >requirements.lock
