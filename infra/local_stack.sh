#!/usr/bin/env bash
# A local stand-in for the cluster services, all on 127.0.0.1: an MLflow server (sqlite backend, proxied
# artifacts, no job runner), an S3 endpoint (moto server) and a Ray head node.
#   infra/local_stack.sh up      start them; writes outputs/stack/env (source it) with the addresses
#   infra/local_stack.sh down    stop what `up` started (by the PIDs it recorded)
# Then: source outputs/stack/env && python -m jobs.train --config jobs/configs/local.yaml \
#         checkpoint.storage_path=s3://kpp-runs/ray
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
DIR=outputs/stack
MLFLOW_PORT=${MLFLOW_PORT:-5000}
S3_PORT=${S3_PORT:-9000}
RAY_PORT=${RAY_PORT:-6379}  # outside Ray's worker port range (10002-19999)

up() {
  mkdir -p "$DIR/artifacts"
  # the job runner (huey consumers) takes ~2.4 GB; without it the server takes ~0.5 GB
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
    --backend-store-uri "sqlite:///$PWD/$DIR/mlflow.db" --artifacts-destination "$PWD/$DIR/artifacts" \
    --workers 1 >"$DIR/mlflow.log" 2>&1 &
  echo $! >"$DIR/mlflow.pid"
  nohup "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$DIR/s3.log" 2>&1 &
  echo $! >"$DIR/s3.pid"
  cat >"$DIR/env" <<ENV
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export RAY_ADDRESS=127.0.0.1:$RAY_PORT
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=1.0
# token auth keeps one token in ~/.ray/auth_token, shared by every cluster this user starts on the machine:
# a second cluster rewrites it and locks the first one's drivers out. A loopback-only dev stack needs none.
export RAY_AUTH_MODE=disabled
ENV
  # shellcheck disable=SC1090
  source "$DIR/env"
  # --block keeps `ray start` in the foreground holding the node; ending that one PID stops what it started,
  # where `ray stop` would stop every Ray process on the machine, other users' included
  nohup "$BIN/ray" start --head --block --port "$RAY_PORT" --num-cpus "$(nproc)" --include-dashboard=false \
    >"$DIR/ray.log" 2>&1 &
  echo $! >"$DIR/ray.pid"
  for _ in $(seq 60); do curl -sf "$MLFLOW_TRACKING_URI/health" >/dev/null && break; sleep 0.5; done
  "$PY" - <<'PYEOF'
import boto3
s3 = boto3.client("s3")
for bucket in ("kpp-data", "kpp-runs"):
    s3.create_bucket(Bucket=bucket)
PYEOF
  for _ in $(seq 60); do "$BIN/ray" status --address "$RAY_ADDRESS" >/dev/null 2>&1 && break; sleep 0.5; done
  echo "up: MLflow $MLFLOW_TRACKING_URI, S3 $AWS_ENDPOINT_URL (buckets kpp-data, kpp-runs), Ray $RAY_ADDRESS"
  echo "run: source $DIR/env"
}

down() {
  # `ray start --block` stops its node's processes on SIGTERM, which takes a few seconds
  if [[ -f "$DIR/ray.pid" ]]; then
    pid=$(cat "$DIR/ray.pid"); kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    rm -f "$DIR/ray.pid"
  fi
  for svc in mlflow s3; do
    if [[ -f "$DIR/$svc.pid" ]]; then kill "$(cat "$DIR/$svc.pid")" 2>/dev/null || true; rm -f "$DIR/$svc.pid"; fi
  done
  echo "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
