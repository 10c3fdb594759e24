# The two commands of the README. Both do all set-up first (venv, installs, base model, data).
PY := .venv/bin/python
DATA ?= data/multilingual
DEMO_USER ?= nl
STEPS ?= 150
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo demo-full demo-local test data

setup:
	scripts/setup.sh

$(DATA)/$(DEMO_USER)/train.txt.gz:
	$(PY) -m device_sdk.data build multilingual --out $(DATA)

data: setup $(DATA)/$(DEMO_USER)/train.txt.gz

# Main job, in three parts: (1) a federation on loopback, four SmolLM2 devices (de, fr, it, nl) with 3, 2, 1, 0
# specialists; (2) the export of one device for a phone (ExecuTorch + ONNX, verified); (3) a short comparison of
# collaboration strategies (table + HTML report), run alongside (2) since the ExecuTorch lowering uses one core.
# `make demo` is the short version (about 12 minutes on 2 cores): fewer rounds and steps, shorter sequences, fewer
# evaluation tokens, and the export of the device with the smallest program (nl: the generalist only; the lowering
# grows with the experts). `make demo-full` is the long version (about an hour on 2 cores; it exports the German
# 4-expert device). Any variable below can be set on the command line, e.g. `make demo ROUNDS=3 EXPORT_USER=de`.
ROUNDS ?= 2
LOCAL_STEPS ?= 4
BATCH ?= 4
CTX ?= 64
EVAL_TOKENS ?= 2048
ROUTER_PERIOD ?= 2
ROUTER_STEPS ?= 2
EXPORT_USER ?= nl
SIM_ARGS ?= --rounds 2 --local-steps 3 --batch 4 --ctx 64 --router-period 3 --eval-tokens 1024 --peer-eval-tokens 512
demo: data
	$(PY) examples/federation_demo.py --data $(DATA) --specialists de=3,fr=2,it=1,nl=0 --rounds $(ROUNDS) \
		--local-steps $(LOCAL_STEPS) --batch $(BATCH) --ctx $(CTX) --eval-tokens $(EVAL_TOKENS) \
		--router-period $(ROUTER_PERIOD) --router-steps $(ROUTER_STEPS) --export $(EXPORT_USER) --out runs/federation \
		--compare "--preset demo --out runs/compare $(SIM_ARGS)"

demo-full:
	$(MAKE) demo ROUNDS=3 LOCAL_STEPS=10 BATCH=8 CTX=128 EVAL_TOKENS=16384 ROUTER_PERIOD=10 ROUTER_STEPS=5 \
		EXPORT_USER=de SIM_ARGS=

# Single device: personalise SmolLM2 on one language user, test perplexity before/after.
demo-local: data
	$(PY) -m device_sdk train-local --data $(DATA)/$(DEMO_USER) --model smollm2-135m --specialists 1 \
		--steps $(STEPS) --eval-every 25 --out runs/demo-$(DEMO_USER) --overwrite

# Test suite: tiny in-process models, plus the marked real-model checks (they fit in CI). Two workers, one test
# file each at a time (a file's tests share module fixtures such as one ExecuTorch lowering).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
