#!/usr/bin/env bash
# The local stand-in for the cluster's services (Ray head with dashboard and Jobs API, MLflow server, S3 endpoint),
# all on 127.0.0.1. The work is done by infra/local_stack.py, which the test suite uses too.
#   infra/local_stack.sh up | down | status      then: source outputs/stack/env
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PY:-.venv/bin/python}" infra/local_stack.py "$@"
