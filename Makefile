# lmkit: make demo (the main job on the embedded default corpus), make test (the suite).
# The torch build is yours to choose: the default is the CPU/CUDA wheel PyPI serves for 2.13.0;
# e.g. make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
LMKIT := $(BIN)/lmkit
DEMO ?= out/demo

.PHONY: install demo test lint bench clean lock

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The main job on the embedded default: synthetic stories -> corpus -> sentencepiece vocab -> shards.
demo: install
	$(LMKIT) data synthetic -o $(DEMO)/corpus --force
	$(LMKIT) vocab $(DEMO)/corpus -o $(DEMO)/tokenizer --kind sentencepiece --vocab-size 2048 --force
	$(LMKIT) pretokenize $(DEMO)/corpus --tokenizer $(DEMO)/tokenizer -o $(DEMO)/shards --force
	$(BIN)/python -c "import json; m = json.load(open('$(DEMO)/shards/meta.json')); print(json.dumps(m['tokens']))"

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check toolkit tests benchmarks

bench: install
	$(BIN)/python benchmarks/pretokenize.py $(DEMO)/corpus --tokenizer $(DEMO)/tokenizer

# Re-pin the dependency set after changing pyproject.toml (torch is chosen by TORCH, not pinned here).
lock: install
	$(BIN)/pip freeze --exclude-editable | grep -v -i -E '^(torch|nvidia-|triton)' > constraints.txt

clean:
	rm -rf $(VENV) out
