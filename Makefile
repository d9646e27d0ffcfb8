# vitq developer entry points. `make demo` and `make test` are the two commands in the README.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# The bundled real weights and images live beside the repository; callers may override.
ifeq ($(origin VITQ_ASSETS), undefined)
  ifneq ($(wildcard ../shared/assets),)
    export VITQ_ASSETS := $(abspath ../shared/assets)
  endif
endif
DEMO_OUT ?= runs/demo-deit_tiny-w4a4

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' -c requirements.lock
	touch $@

venv: $(VENV)/.installed

demo: venv
	@test -n "$(VITQ_ASSETS)" || { echo "demo needs ../shared/assets or VITQ_ASSETS=/path/to/assets" >&2; exit 2; }
	$(VENV)/bin/vitq quantize deit_tiny --calib $(VITQ_ASSETS)/imagenet-sample --calib-list $(VITQ_ASSETS)/calib32.txt \
	  --eval $(VITQ_ASSETS)/imagenet-sample --eval-list $(VITQ_ASSETS)/eval968.txt \
	  --w-bits 4 --a-bits 4 --overwrite --out $(DEMO_OUT)

test: venv
	$(PY) -m pytest -q

lint: venv
	$(PY) -m pip install -q -e '.[lint]'
	$(VENV)/bin/ruff check src tests benchmarks

bench: venv
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
