#!/bin/bash
# One end-to-end command in a checkout of pairforge, for old-against-new comparisons (run two checkouts in turn,
# A B A B ..., and compare pair by pair):
#   bench/run_in_tree.sh TREE MODE SAMPLES [SHARD_SIZE] [EXAMPLE]
# TREE: a checkout with .venv (e.g. `git worktree add /tmp/old REV` and a link to the venv); MODE: loopplain (the
# fair loop, bench_flow.py --bare-run), loop (the same with PAIRFORGE_MALLOC=heap's allocator settings: --tuned) or
# build (pairforge build on the embedded defaults); SHARD_SIZE: an integer, "example" (default) or "unset"; EXAMPLE: chest_ct_nodules
# (default, at 512x512) or surface_defects (at its own 1024x1024);
# the root is a fresh temporary folder, removed after; PREFECT_HOME is the bench's own (bench_flow.py).
set -u
TREE=$1; MODE=$2; N=$3; SHARD=${4:-example}; EXAMPLE=${5:-chest_ct_nodules}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cd "$TREE"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH="$TREE"
export PREFECT_HOME=${PREFECT_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/pairforge-bench-prefect}
.venv/bin/python -c "
import sys; sys.path.insert(0, 'bench'); from bench_flow import bench_spec_text
ex = '$EXAMPLE'
open('$W/spec.yaml', 'w').write(bench_spec_text($N, 512 if ex == 'chest_ct_nodules' else None, '$SHARD', ex))"
case $MODE in
  loop) .venv/bin/python bench/bench_flow.py --bare-run "$W/spec.yaml" "$W/data" --workers 2 --tuned > "$W/out.txt" ;;
  loopplain) .venv/bin/python bench/bench_flow.py --bare-run "$W/spec.yaml" "$W/data" --workers 2 > "$W/out.txt" ;;
  build) .venv/bin/pairforge build "$W/spec.yaml" --root "$W/data" --workers 2 > "$W/out.txt" ;;
  *) echo "MODE must be loop, loopplain or build, not $MODE" >&2; exit 2 ;;
esac
