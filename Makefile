# Two commands from a fresh clone: `make demo` and `make test`. Everything else is here for operators.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_CACHE ?= $(HOME)/.cache/pip
KAFKA_PORT ?= 9092
export KAFKA_PORT
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install kafka-up kafka-down demo demo-drift test test-fast lint bench soak schemas clean teacher

$(BIN)/sentiment: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --cache-dir $(PIP_CACHE) -q --upgrade pip
	$(BIN)/pip install --cache-dir $(PIP_CACHE) -q -e ".[train,dev]"
	touch $(BIN)/sentiment

install: $(BIN)/sentiment ## .venv with the project and its train + dev extras

kafka-up: ## start (or reuse) the local Apache Kafka 4.x broker on 127.0.0.1:$(KAFKA_PORT)
	deploy/kafka/kafka.sh up

kafka-down:
	deploy/kafka/kafka.sh down

demo: install kafka-up ## local Kafka + worker + sample texts in, labelled events out
	$(BIN)/python -m worker.demo

demo-drift: install kafka-up ## drift alert -> retrain -> gated promotion -> hot reload, end to end
	$(BIN)/pytest -q -s tests/test_drift_loop.py

test: install kafka-up ## the whole suite against the real broker
	$(BIN)/pytest -q

test-fast: install ## unit tests only (no broker)
	$(BIN)/pytest -q -m "not kafka"

lint: install
	$(BIN)/ruff check .

schemas: install ## regenerate schemas/json after changing schemas/*.py
	$(BIN)/python -m schemas.generate

teacher: install ## fetch, hash-check and unpack the 110M teacher encoder into .cache/teacher (training only)
	$(BIN)/python deploy/teacher/fetch.py

bench: install kafka-up ## throughput/latency benchmark; prints one JSON object last
	$(BIN)/python -m bench.run

clean:
	rm -rf .pytest_cache .ruff_cache build *.egg-info

soak: install kafka-up ## fault tests at full size (kill -9 x5 on 50k, 10k fuzzed, rebalance, broker restart); JSON last
	$(BIN)/python -m bench.soak
