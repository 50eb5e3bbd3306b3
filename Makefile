# webos device pipeline. `make run` starts everything, `make test` runs the suite.
# Both install what is missing first: a venv in .venv, Debian packages, Kafka's jars, and the
# RabbitMQ 4 runtime (built once per machine into ~/.cache/webos-pipeline; make clean keeps it).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# uidmap: mmdebstrap builds the RabbitMQ 4 root without root through it (newuidmap).
# prometheus: its promtool tests the alert rules; the stack runs it under WEBOS_PROMETHEUS=1.
RUN_PACKAGES := mmdebstrap $(if $(SUDO),uidmap) default-jre-headless $(if $(shell command -v mvn),,maven) prometheus
# The container engine (make images, and the suite's compose and testcontainers tests): Debian's
# podman with runc, netavark (its firewall rules through iptables) and aardvark-dns (service
# names), docker-compose 1.29 on its API.
CONTAINER_PACKAGES := podman runc netavark aardvark-dns iptables docker-compose
TEST_PACKAGES := chromium mosquitto-clients $(CONTAINER_PACKAGES)
PYTEST_ARGS ?=

.PHONY: help install install-test run up stop status clean test bench soak outage images stop-engine

help:
	@echo "make run      install what is missing, start RabbitMQ + Kafka + publisher, bridge, relay, consumer"
	@echo "make test     the whole test suite against real brokers (its own, on free ports), then"
	@echo "              the pipeline tests on brokers in containers"
	@echo "make up       start only the brokers in the background (make stop stops them)"
	@echo "make stop     stop brokers left running"
	@echo "make status   show which local brokers run, and each app's state under make run"
	@echo "make clean    stop the brokers and delete their data and logs (.stack/; .env stays)"
	@echo "make bench    every benchmark on fresh brokers (~25 min), results in bench/results/"
	@echo "make soak     1,000 devices on 3+3 brokers of its own under random faults for SOAK_MINUTES (30), then the audit"
	@echo "make outage   Kafka down OUTAGE_MINUTES (10) under 1,000 msg/s, then the drain and the audit"
	@echo "make images   podman and the images docker-compose.yml runs, built here (then: docker-compose up -d)"
	@echo "make stop-engine  stop podman's API service that make images started (containers stay)"

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

kafka/lib/.installed: kafka/pom.xml
	@echo "fetching Apache Kafka's jars from Maven Central into kafka/lib/"
	mvn --quiet --batch-mode -Dstyle.color=never -f kafka/pom.xml dependency:copy-dependencies
	touch $@

# Debian packages, installed only when missing (apt-get update once, first).
define apt_ensure
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

install: $(VENV)/.installed
	$(call apt_ensure,$(RUN_PACKAGES))
	@# Debian starts its own Prometheus on *:9090 where systemd runs: the stack runs its own.
	@if [ -d /run/systemd/system ] && systemctl is-enabled --quiet prometheus 2>/dev/null; then \
		echo "disabling Debian's prometheus service (the stack runs its own on 127.0.0.1)"; \
		$(SUDO) systemctl disable --now prometheus; fi
	@$(MAKE) --no-print-directory --silent kafka/lib/.installed
	@$(PY) -m stack.rabbitmq_runtime

install-test: install
	$(call apt_ensure,$(TEST_PACKAGES))

run: install
	$(PY) -m stack run

up: install
	$(PY) -m stack up

stop:
	$(PY) -m stack down

status:
	$(PY) -m stack status

clean:
	$(PY) -m stack clean

# COLUMNS: without a terminal pytest assumes 80 and cuts the reason off each failure's summary line.
# Then the pipeline tests once more, on RabbitMQ and Kafka in containers (testcontainers).
test: install-test
	COLUMNS=$${COLUMNS:-200} $(PY) -m pytest $(PYTEST_ARGS)
	COLUMNS=$${COLUMNS:-200} WEBOS_TEST_BROKERS=containers $(PY) -m pytest -m pipeline $(PYTEST_ARGS)

bench: install
	$(PY) -m bench

SOAK_MINUTES ?= 30
SOAK_SEED ?=
soak: install
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) $(if $(SOAK_SEED),--seed $(SOAK_SEED))

OUTAGE_MINUTES ?= 10
outage: install
	$(PY) -m bench.kafka_outage --minutes $(OUTAGE_MINUTES)

images: install
	$(call apt_ensure,$(CONTAINER_PACKAGES))
	$(PY) -m stack.images

stop-engine:
	$(PY) -m stack.images stop-engine
