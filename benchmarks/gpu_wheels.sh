#!/usr/bin/env bash
# Wheels of the pure-Python packages that the lent GPU machine's image lacks (mnist1d,
# efficientnet_pytorch; the versions of constraints.txt), built here into .whl/ and kept out of
# git through .git/info/exclude, so that a device call carrying .whl gets them installed by
# gpu_check.sh. Run from the repository root before the device call:
#
#     bash benchmarks/gpu_wheels.sh [PYTHON]
set -euo pipefail
py=${1:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude)  # .git is a file in a worktree
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || printf '\n/.whl/\n' >>"$exclude"
mkdir -p .whl
pins=$(grep -iE '^(mnist1d|efficientnet_pytorch)==' constraints.txt)
# shellcheck disable=SC2086  # one argument per pin
"$py" -m pip wheel -q --no-deps -w .whl $pins
ls .whl
