# The two commands of the README. Both do all set-up first (venv, installs, base model, data).
PY := .venv/bin/python
DATA ?= data/multilingual
DEMO_USER ?= nl
STEPS ?= 150
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo demo-local test data

setup:
	scripts/setup.sh

$(DATA)/$(DEMO_USER)/train.txt.gz:
	$(PY) -m device_sdk.data build multilingual --out $(DATA)

data: setup $(DATA)/$(DEMO_USER)/train.txt.gz

# Main job: a federation on loopback, four SmolLM2 devices (de, fr, it, nl) with 3, 2, 1, 0 specialists, the
# export of one device for a phone, then a short comparison of collaboration strategies (table + HTML report).
ROUNDS ?= 3
demo: data
	$(PY) examples/federation_demo.py --data $(DATA) --specialists de=3,fr=2,it=1,nl=0 --rounds $(ROUNDS) \
		--out runs/federation
	$(PY) -m device_sdk simulate --preset demo --data $(DATA) --out runs/compare

# Single device: personalise SmolLM2 on one language user, test perplexity before/after.
demo-local: data
	$(PY) -m device_sdk train-local --data $(DATA)/$(DEMO_USER) --model smollm2-135m --specialists 1 \
		--steps $(STEPS) --eval-every 25 --out runs/demo-$(DEMO_USER)

# Test suite: tiny in-process models, plus the marked real-model checks (they fit in CI). Two workers, one test
# file each at a time (a file's tests share module fixtures such as one ExecuTorch lowering).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
