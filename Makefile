# Both targets install what they need (apt packages, the venv, pip packages)
# and need root: the lab creates network namespaces and iptables rules.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test bench bootstrap unit netns iptables-rules keepalived-samples lab-down clean

demo:
	@bash scripts/bootstrap.sh runtime
	$(VENV)/bin/nfq-sttcp demo

test: bootstrap
	$(PY) -m pytest -v --timeout=600 $(PYTEST_ARGS) tests

bootstrap:
	@bash scripts/bootstrap.sh dev

# The benchmark against plain TCP (about 35 minutes; BENCH_ARGS=--quick for ~6).
bench:
	@bash scripts/bootstrap.sh bench
	$(VENV)/bin/nfq-sttcp bench $(BENCH_ARGS)

unit: bootstrap
	$(PY) -m pytest -q tests/unit

netns: bootstrap
	$(PY) -m pytest -v --timeout=600 tests/netns

# The files in iptables/ are the rendered rules of the lab config.
iptables-rules: bootstrap
	$(PY) -c "from nfq_sttcp import lab, rules; c = lab.lab_config(); \
	[open('iptables/%s.rules' % r, 'w').write(rules.render(c, r)) for r in ('primary', 'backup')]"

# The sample keepalived.conf of each role (vip_owner = "keepalived").
keepalived-samples: bootstrap
	$(PY) -c "from nfq_sttcp import keepalived as k, lab; c = lab.lab_config(vip_owner='keepalived'); \
	[open('vagrant/keepalived/keepalived-%s.conf' % r, 'w').write(k.render(c, r, k.SAMPLE_NOTIFY)) for r in ('primary', 'backup')]"

lab-down:
	$(VENV)/bin/nfq-sttcp lab down

clean: lab-down
	rm -rf $(VENV) demo-out bench-out nfq_sttcp/*.so .pytest_cache .hypothesis *.egg-info
