# ggtalker — one-command setup, demo, tests and benchmarks. Needs only python3 and PyPI: FFmpeg comes
# inside the av wheel (PyAV), so no system package is installed.
#   make demo [VIDEO=my.mp4] [AUDIO=speech.wav]   set up, then video → avatar → talking mp4 (out/demo/)
#   make test                                      set up, then the test suite (what CI runs)
#   make bench                                     the quality/speed table over every real clip

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines use the pinned CPU torch (no CUDA download); machines with an NVIDIA driver get plain torch + gsplat.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
PIP_CONSTRAINT := $(if $(HAS_CUDA),,-c constraints.txt)
EXTRAS := offline-models,test$(if $(HAS_CUDA),$(comma)cuda,)
comma := ,

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_CONSTRAINT) "torch$(if $(HAS_CUDA),,==2.13.0)"
	$(BIN)/pip install -q $(PIP_CONSTRAINT) -e ".[$(EXTRAS)]"
	# openai-whisper without its triton dependency (~1 GB, unused on CPU); its real deps come with ggtalker.
	$(BIN)/pip install -q --no-deps openai-whisper
	touch $@

demo: setup
	$(BIN)/ggtalker demo $(if $(VIDEO),--video "$(VIDEO)") $(if $(AUDIO),--audio "$(AUDIO)")

test: setup
	$(BIN)/python -m pytest -q -m "not slow" --timeout 900

bench: setup
	$(BIN)/python -m bench.run_all --out bench/results

clean:
	rm -rf $(VENV) out .pytest_cache
