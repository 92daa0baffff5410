#!/usr/bin/env bash
# Install Infinity (michaelfeil/infinity, the `infinity_emb` server) for tests/test_infinity.py.
#
# Why a separate venv: infinity-emb 0.0.78 pins numpy<2 and sentence-transformers<4 (and click/typer/rich/
# uvicorn ranges), while the project runs numpy 2 and sentence-transformers 6; so Infinity gets its own venv
# (.venv-infinity) with the same CPU torch as the project's, and the test starts it as a subprocess serving
# the packaged all-MiniLM-L6-v2 from its local path (no hub download). ~1.4 GB, ~3-7 min on 2 cores.
# Usage: scripts/setup_infinity.sh [VENV_DIR]   (default .venv-infinity; TORCH=torch==2.13.0 as in the Makefile)
set -euo pipefail
DIR="${1:-.venv-infinity}"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
test -x "$DIR/bin/python" || "$PYTHON" -m venv "$DIR"
"$DIR/bin/python" -m pip install -q --upgrade pip
"$DIR/bin/python" -m pip install -q "$TORCH" "infinity-emb[server,torch]==0.0.78"
"$DIR/bin/infinity_emb" --help >/dev/null
echo "infinity_emb ready in $DIR"
