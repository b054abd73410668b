#!/usr/bin/env bash
# The GPU check, one script, about 8 minutes on a CUDA machine with internet access to the package registries:
# sets up a venv with CUDA torch, vLLM and evomerge; builds (or reuses) the demo family; runs the demo search
# (10 trials) on --device cuda with the HF backend and with vLLM; prints per-trial materialize / eval seconds of
# both; runs the backend-agreement test (loglikelihood within 1e-3, greedy exact match on >= 95% of items).
#   bash benchmarks/gpu_check.sh            # from the repository root; writes under results/gpu_check/
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi: this needs a CUDA machine" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
VENV=${VENV:-.venv-gpu}
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "torch>=2.4" vllm
"$VENV/bin/pip" install -q -e '.[dev]'
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=results/gpu_check
mkdir -p "$OUT"
"$VENV/bin/evomerge" zoo build >/dev/null
for backend in hf vllm; do
  "$VENV/bin/python" - "$backend" "$OUT" <<'PY'
import json, sys, time
from pathlib import Path
import optuna
from search.config import load_search_config
from search.loop import search
backend, out = sys.argv[1], Path(sys.argv[2])
config = load_search_config("configs/demo.yaml").model_copy(update={
    "name": f"gpu_{backend}", "device": "cuda", "evaluator": backend, "n_trials": 10, "output_dir": str(out / backend)})
started = time.perf_counter()
study = search(config, progress=False, rerun="new")
trials = [t for t in study.trials if t.state.name == "COMPLETE"]
rows = [(t.number, t.user_attrs["materialize_seconds"], t.user_attrs["eval_seconds"], t.value) for t in trials]
print(f"{backend}: {len(trials)} trials in {time.perf_counter() - started:.1f} s (baselines and engine start included)")
for number, m, e, v in rows:
    print(f"  trial {number}: materialize {m:.3f} s, eval {e:.3f} s, objective {v:.4f}")
med = lambda xs: sorted(xs)[len(xs) // 2]
print(f"  median materialize {med([r[1] for r in rows]):.3f} s, eval {med([r[2] for r in rows]):.3f} s")
(out / f"{backend}.json").write_text(json.dumps(rows))
PY
done
"$VENV/bin/python" -m pytest -q tests/test_vllm_backend.py -k "agree or adapter" -rs
