#!/usr/bin/env bash
# Size and time of a clean base install (no extras), then the default job run in it without torch.
# Usage: bench/base_install.sh [venv folder, default /tmp/pf-base]   (run from the repository root)
# README "Quick start" quotes its output (measured 2026-11-27 on the project's 2-core machine, load ~12:
# 989 MB, 5:58 install from the local wheel mirror, 218 s for examples/chest_ct_nodules.yaml).
set -euo pipefail
venv=${1:-/tmp/pf-base}
src=$(pwd)
rm -rf "$venv"
python3 -m venv "$venv"
start=$(date +%s)
"$venv/bin/pip" install -q "$src"
echo "install: $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)"
if "$venv/bin/python" -c "import torch" 2>/dev/null; then echo "torch is installed: not a base install"; exit 1; fi
work=$(mktemp -d)
cd "$work"
start=$(date +%s)
PREFECT_HOME="$work/prefect" "$venv/bin/pairforge" build "$src/examples/chest_ct_nodules.yaml" --root "$work/datasets"
echo "default job without torch: $(( $(date +%s) - start )) s"
