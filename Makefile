# Two commands do everything on a fresh machine:
#   make demo   the main job on the built-in default (configs/counterpoint.yaml)
#   make test   the test suite (make test-fast: the unit tier, under 2 minutes)
VENV ?= .venv
RLHF = $(VENV)/bin/rlhf

.PHONY: setup demo quick test test-fast bench
setup:
	@bash scripts/setup.sh $(VENV)

demo: setup
	$(RLHF) run configs/counterpoint.yaml --resume

quick: setup
	$(RLHF) run configs/counterpoint.yaml --quick --resume

# python -m apps.hugepages: pytest's own process gets glibc's huge pages, as the rlhf command does
test: setup
	$(VENV)/bin/python -m apps.hugepages -m pytest -q

# the unit tier: math, rules, configs and the RL engine on a toy task (no pipeline runs)
test-fast: setup
	$(VENV)/bin/python -m apps.hugepages -m pytest -q -m "not integration"

bench: setup
	$(VENV)/bin/python benchmarks/hugepages.py
	$(VENV)/bin/python benchmarks/rule_rewards.py
	$(VENV)/bin/python benchmarks/rl_throughput.py
	$(VENV)/bin/python benchmarks/bleu_reward.py
	$(VENV)/bin/python benchmarks/pretrain_step.py
	$(VENV)/bin/python benchmarks/reward_training.py
	$(VENV)/bin/python benchmarks/scaling.py
