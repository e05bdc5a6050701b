#!/usr/bin/env bash
# Wheels that the lent GPU machine lacks, for benchmarks/gpu_check.sh's Snakemake run: Snakemake
# and its dependencies into .whl/ (pure-Python wheels built here, CPython 3.12 manylinux builds of
# the compiled ones, since that machine runs Python 3.12). Run here, then carry .whl:
#   bash benchmarks/gpu_wheels.sh     # about 30 MB
set -euo pipefail
PY="${PY:-.venv/bin/python}"
DEST="${DEST:-.whl}"
version=$("$PY" -c "import importlib.metadata as m; print(m.version('snakemake'))")
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip wheel -q --disable-pip-version-check "snakemake==$version" -w "$DEST"
for whl in "$DEST"/*.whl; do
  case "$whl" in *-none-any.whl|*-abi3-*) continue ;; esac
  name=$(basename "$whl" | cut -d- -f1) ver=$(basename "$whl" | cut -d- -f2)
  rm "$whl"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux_2_24_x86_64 -d "$DEST" "$name==$ver"
done
du -sh "$DEST"
