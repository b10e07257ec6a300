# make demo   — build the CPU app environment if missing, then serve the chat page (http://127.0.0.1:7860)
# make test   — build every environment the tests need, then run the whole suite (what CI runs)
# make bench  — serving speed on this machine: raw generate vs engine vs HTTP, 1/4/8 concurrent clients;
#               a long prompt's prefill vs a short question and a running stream (one pass vs chunked)
# make demo-model — rebuild infer_engine/demo_model with the project's own training pipeline (tiny preset)
VENV := .venv
TRAIN_VENV := .venv-train
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: demo test bench lint env dev-env train-env system-deps demo-model

env:
	@bash scripts/make_app_env.sh $(VENV)

dev-env:
	@bash scripts/make_app_env.sh $(VENV) --dev

train-env:
	@bash training/make_train_env.sh $(TRAIN_VENV)

system-deps:
	@bash scripts/install_system_deps.sh

demo: env
	$(VENV)/bin/python app.py

lint: dev-env
	$(VENV)/bin/ruff check .

# Training tests run in the XTuner environment, everything else in the app environment; no model hub is contacted.
test: dev-env train-env system-deps lint
	HF_HUB_OFFLINE=1 $(TRAIN_VENV)/bin/python -m pytest tests/training -q
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest tests -q --ignore=tests/training

bench: env
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m bench.bench_serving
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m bench.bench_prefill

demo-model: train-env
	bash training/run.sh --preset tiny --name UbUb --work-dir .work/demo-model --from data
	rm -rf infer_engine/demo_model
	cp -r .work/demo-model/merged infer_engine/demo_model
	cp .work/demo-model/eval.md infer_engine/demo_model/eval.md
