# Two commands for a new machine: `make serve` (set up, then run the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 50051
METRICS_PORT ?= 9464
# REDIS: the job queue's Redis URL; empty: `serve` starts a local redis-server (data in run/redis) and a worker
REDIS ?=
# The install happens again only when the requirements change (this stamp is older than them).
STAMP := $(VENV)/.installed

.PHONY: setup serve stop demo test lint bench-quick

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

# The server's pid goes to run/serve.pid (exec keeps the shell's pid), so `make stop` can stop it.
serve: setup
	$(BIN)/python -m server.protogen
	mkdir -p run && echo $$$$ > run/serve.pid && exec $(BIN)/diffserve serve --config zoo/models.toml --port $(PORT) --metrics-port $(METRICS_PORT) $(if $(REDIS),--redis $(REDIS))

# SIGTERM to the server `make serve` started: it stops admitting at once and drains in-flight work.
stop:
	@if [ -f run/serve.pid ] && kill -0 $$(cat run/serve.pid) 2>/dev/null; then \
		pid=$$(cat run/serve.pid); kill -TERM $$pid; echo "stopping diffserve (pid $$pid)"; \
		for i in $$(seq 60); do kill -0 $$pid 2>/dev/null || break; sleep 0.5; done; \
		rm -f run/serve.pid; \
	else echo "no server started by make serve is running"; rm -f run/serve.pid; fi

demo: setup
	$(BIN)/diffserve generate --model digits-ddpm --sampler dpmpp_2m --steps 10 --class 3 --guidance 2 --n 16 --seed 0 --scale 8 --out run/grid.png

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench-quick: setup
	$(BIN)/python -m bench samplers --quick
