#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has Python 3.12, a CUDA torch, numpy, pandas, scipy, h5py, pyyaml,
# safetensors, tqdm, einops, psutil, ... but no package index): downloaded here into .whl/ (ignored by git),
# carried with `carry: [".whl"]`, installed by benchmarks/gpu_check.sh. DeepSpeed ships only a source
# archive: its wheel is built here (pure Python, no compiled ops).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  performer-pytorch==1.1.4 local-attention==1.11.2 axial-positional-embedding==0.3.12 hyper-connections==0.4.11 \
  torch-einops-utils==0.2.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
  anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.0.3 \
  session-info2==0.4.1 hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5
DS_BUILD_OPS=0 $PY -m pip wheel --quiet --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
du -sh .whl
