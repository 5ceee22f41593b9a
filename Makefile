# MedGPT-oss nano: `make demo` and `make test` set themselves up (a .venv with pinned packages).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-fast demo clean

setup: $(VENV)/.installed

# torch==2.13.0 is pinned; on this project's CPU machines pip resolves it to the CPU build.
# radlabels (a registry package that ships 1,000 synthetic chest X-ray reports for the demo) pins an old
# torch in its metadata, so it is installed without its dependencies: we read only its data file.
# medspacy and PyRuSH (RaTEScore's sentence splitter) ask for spacy<3.8 on Python < 3.12 only; spacy<3.8 is
# built against numpy 1 and fails to import beside numpy 2, so they go --no-deps on spaCy 3.8 (the version they
# require on Python 3.12) with their other dependencies pinned in requirements-dev.txt. f1chexbert (CheXbert's
# labeler, the s_emb oracle in the tests) pulls nothing we do not pin.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps radlabels==0.2.0
	$(PY) -m pip install -q --no-deps medspacy==1.3.1 PyRuSH==1.0.13 f1chexbert==0.0.2
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	rm -rf out/demo
	$(PY) -m data.demo --out out/demo/data
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 train_stage1.py --preset=tiny
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 train_stage2.py --preset=tiny
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 train_stage3.py --preset=tiny
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 eval.py --model out/demo/stage3/final --bench demo_vqa \
		--data_dir out/demo/data/eval --out_dir out/demo/eval --batch_size 32 --max_new_tokens 8
	$(PY) -m data.demo --report out/demo

clean:
	rm -rf $(VENV) out
