#!/usr/bin/env bash
# One command on a machine with one H100/H200: every gpu-marked test and every bench at its headline sizes within
# 10 minutes, then a dated markdown report in benches/results/. Arguments go to benches/run_gpu.py (see --help);
# PYTHON picks the interpreter (default: python3, the one holding torch on the GPU image).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" benches/run_gpu.py "$@"
