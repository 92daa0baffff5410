#!/usr/bin/env bash
# Install the BigQuery emulator used by tests/test_export_bigquery.py and tests/test_load_bigquery.py.
#
# Why a separate venv: bqemulator pins protobuf<7 (through grpcio-tools) and needs DuckDB's spatial
# extension, which DuckDB normally downloads at start-up; the PyPI package duckdb-extension-spatial ships it,
# for DuckDB 1.5.5 only. So the emulator gets its own venv (.venv-bqemu) with duckdb 1.5.5 and a HOME whose
# ~/.duckdb holds the extension; the project's venv keeps its own versions. Tests start it as a subprocess.
# Usage: scripts/setup_bq_emulator.sh [VENV_DIR]   (default .venv-bqemu; ~1 min, ~250 MB)
set -euo pipefail
DIR="${1:-.venv-bqemu}"
PYTHON="${PYTHON:-python3}"
test -x "$DIR/bin/python" || "$PYTHON" -m venv "$DIR"
"$DIR/bin/python" -m pip install -q --upgrade pip
"$DIR/bin/python" -m pip install -q "bqemulator==1.4.0" "duckdb==1.5.5" "duckdb-extension-spatial==1.5.5" numpy
mkdir -p "$DIR/home"
HOME="$(cd "$DIR/home" && pwd)" "$DIR/bin/python" - <<'PY'
import os, duckdb, duckdb_extension_spatial
base = os.path.dirname(duckdb_extension_spatial.__file__)
ext = os.path.join(base, "extensions", f"v{duckdb.__version__}", "spatial.duckdb_extension")
con = duckdb.connect()
con.execute(f"INSTALL '{ext}'")
con.execute("LOAD spatial")
print("bqemulator ready, DuckDB", duckdb.__version__, "with spatial")
PY
