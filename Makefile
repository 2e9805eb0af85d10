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

$(VENV)/.installed: pyproject.toml setup.py toolkit/models/llama_cpu.c toolkit/models/attractor/relax_cpu.c toolkit/models/exp_f32.h constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The main job on the embedded default: synthetic stories -> corpus -> sentencepiece vocab -> shards ->
# an inner_arianna-shaped model (288/6/6) trained for about 3 minutes on 2 CPU cores -> eval -> samples.
# (`lmkit train RECIPE` alone would make the corpus, vocab and shards itself; the demo shows each step.)
DEMO_TRAIN = --set data.source=$(DEMO)/shards --set tokenizer.path=$(DEMO)/tokenizer --set model.vocab_size=0 \
	--set model.max_seq_len=128 --set train.batch_size=16 --set train.grad_accum=1 --set train.max_iters=800 \
	--set train.warmup_iters=30 --set train.lr=2e-3 --set train.min_lr=2e-4 --set train.eval_interval=200
demo: install
	$(LMKIT) data synthetic -o $(DEMO)/corpus --force
	$(LMKIT) vocab $(DEMO)/corpus -o $(DEMO)/tokenizer --kind sentencepiece --vocab-size 1024 --force
	$(LMKIT) pretokenize $(DEMO)/corpus --tokenizer $(DEMO)/tokenizer -o $(DEMO)/shards --force
	$(LMKIT) train inner_arianna --out $(DEMO)/run --force $(DEMO_TRAIN)
	$(LMKIT) eval $(DEMO)/run
	$(LMKIT) chat $(DEMO)/run --prompt "Once upon a time" -n 120 --temperature 0.8 --seed 1
	$(LMKIT) chat $(DEMO)/run --prompt "One day, Tom the dog" -n 120 --temperature 0.8 --seed 2

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check toolkit tests benchmarks

ATTRACTOR_BENCH = recipes/attractor_a1.toml --batch 64 --seq 8 --vocab 8192 --dtype auto --steps 5 --repeats 3
bench: install
	test -f $(DEMO)/corpus/manifest.json || $(LMKIT) data synthetic -o $(DEMO)/corpus --force
	test -f $(DEMO)/tokenizer/tokenizer.json || $(LMKIT) vocab $(DEMO)/corpus -o $(DEMO)/tokenizer --kind sentencepiece --vocab-size 1024 --force
	$(BIN)/python benchmarks/pretokenize.py $(DEMO)/corpus --tokenizer $(DEMO)/tokenizer
	$(BIN)/python benchmarks/train_throughput.py recipes/tinystories15m.toml --batch 16 --seq 256 --dtype float32
	$(BIN)/python benchmarks/train_throughput.py recipes/tinystories15m.toml --batch 16 --seq 256 --dtype bfloat16
	$(BIN)/python benchmarks/train_throughput.py $(ATTRACTOR_BENCH) --set model.steps=16
	$(BIN)/python benchmarks/train_throughput.py $(ATTRACTOR_BENCH) --set model.steps=16 --set model.vectorized=false
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/audio.py

# Re-pin the dependency set after changing pyproject.toml (torch is chosen by TORCH, not pinned here).
lock: install
	$(BIN)/pip freeze --exclude-editable | grep -v -i -E '^(torch|nvidia-|triton)' > constraints.txt

clean:
	rm -rf $(VENV) out

# ---------------------------------------------------------------------------------------------------
# llama2.c interop and chat: each target is a shell pipeline you can copy.
#   make sample                      train the stories260k smoke recipe, export it, print a greedy sample
#   make export RUN=out/my_run       any run folder -> $(RUN)-llama2c/model.bin + tokenizer.bin (run.c reads them)
#   make import MODEL=stories15M.bin TOKENIZER=tokenizer.bin   llama2.c files -> a run folder
RUN ?= out/stories260k
LLAMA2C ?= $(RUN)-llama2c
PROMPT ?= Once upon a time
MODEL ?= model.bin
TOKENIZER ?= tokenizer.bin
IMPORTED ?= out/imported

.PHONY: smoke-run export export-q8 sample sample-run import bench-generate

# a small run folder to play with: llama2.c's stories260K shape on the built-in synthetic stories
smoke-run: install
	$(LMKIT) train stories260k -o $(RUN) --set train.max_iters=300

# run folder -> llama2.c v0 (what run.c reads), tokenizer.bin and model.json beside it
export: install
	$(LMKIT) export $(RUN) -o $(LLAMA2C)/model.bin --force

# run folder -> int8 Q8_0 (runq.c)
export-q8: install
	$(LMKIT) export $(RUN) -o $(LLAMA2C)/model_q8.bin --format v2 --force

# greedy one-shot sample from the exported .bin; llama2.c gives the same text:
#   ./run $(LLAMA2C)/model.bin -z $(LLAMA2C)/tokenizer.bin -t 0 -i "$(PROMPT)"
sample: export
	$(LMKIT) chat $(LLAMA2C)/model.bin -z $(LLAMA2C)/tokenizer.bin --prompt "$(PROMPT)" -n 200 --temperature 0 --echo

# the same straight from the run folder (stdin works too: echo "$(PROMPT)" | lmkit chat $(RUN) -n 200)
sample-run: install
	echo "$(PROMPT)" | $(LMKIT) chat $(RUN) -n 200 --temperature 0

# any llama2.c model.bin (v0, v1 or v2) and its tokenizer.bin -> a run folder you can chat with, eval, fine-tune
import: install
	$(LMKIT) export $(MODEL) -z $(TOKENIZER) -o $(IMPORTED) --force
	$(LMKIT) chat $(IMPORTED) --prompt "$(PROMPT)" -n 100 --temperature 0 --echo

bench-generate: install
	$(BIN)/python benchmarks/generate.py
