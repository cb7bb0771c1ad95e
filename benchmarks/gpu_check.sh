#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): one command, a verdict per line and a JSON file.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 300 "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
