#!/usr/bin/env bash
# Packages whose only role is the real volumes they carry (RESEARCH.md section 3).
# --no-deps: their own dependencies are large and not needed to read the files.
# gecatsim (GE's CT simulator, BSD-3-Clause) carries the XCAT torso the capture-range
# benchmark uses (training/sources.py, xcat-chest; 1.5.4: the last pure-Python wheel).
# Without them `disa-train` trains on nilearn's ICBM152 brain plus phantoms and
# evaluates on held-out phantoms only.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip install -q --no-deps melage==2.2.0 nimare==0.22.1 totalsegmentator==2.18.0 \
    gecatsim==1.5.4
