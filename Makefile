# Two commands for a new machine: `make serve` (set up, then run the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 50051
METRICS_PORT ?= 9464
# REDIS: the job queue's Redis URL; empty: `serve` starts a local redis-server (data in run/redis) and a worker
REDIS ?=

.PHONY: setup serve demo test lint bench-quick

$(BIN)/python:
	$(PY) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt

serve: setup
	$(BIN)/python -m server.protogen
	$(BIN)/diffserve serve --config zoo/models.toml --port $(PORT) --metrics-port $(METRICS_PORT) $(if $(REDIS),--redis $(REDIS))

demo: setup
	$(BIN)/diffserve generate --model digits-ddpm --sampler dpmpp_2m --steps 10 --class 3 --guidance 2 --n 16 --seed 0 --out run/grid.png

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench-quick: setup
	$(BIN)/python -m bench samplers --quick
