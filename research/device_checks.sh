#!/usr/bin/env bash
# The GPU checks of the training path, as one prepared call of the device tool (about 9 minutes of one GPU):
#   run(command="bash research/device_checks.sh", timeout_s=600)
# Needs torch on the device machine (no Ray, MLflow or data files: the speed checks use random binary images).
# Writes $OUT (or outputs/device) /gpu_speed.json and /gpu_loop.json; each step is bounded so a hang in one
# leaves time for the others, and a failed step does not stop the rest.
set -uo pipefail
out=${OUT:-outputs/device}
mkdir -p "$out"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv || true
# 1. the model's own step (K++, DKM w/ TSM, VAE; fp32 and bf16) at 32 episodes x 32 images
timeout 240 python -m jobs.gpu_speed --out "$out/gpu_speed.json" --steps 30 || echo "gpu_speed failed: $?"
# 2. the training loop beside the bare step in one process, host syncs counted (set_sync_debug_mode)
timeout 240 python -m research.gpu_loop_check --data random --steps 1000 --out "$out/gpu_loop.json" || echo "gpu_loop_check failed: $?"
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("gpu_speed.json", "gpu_loop.json"):
    p = out / name
    print(name, json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "runs"}) if p.exists() else "missing")
PY
