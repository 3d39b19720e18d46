#!/usr/bin/env bash
# Wheels for running the project on a machine whose Python (3.12) has torch, transformers, pillow...
# but not the server's own packages and nothing can be downloaded (the team's lent GPU machine; see
# docs/performance.md). Run here, where pip can download; carry the folder there and install it with:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# The versions are the ones CI tests with (pip list of the project's venv).
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" \
    diffusers==0.42.1 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
    pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 importlib_metadata==10.2.0 \
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
# torchao for the FP8 lever (cp310-abi3: one wheel for every CPython >= 3.10), 3.4 MB.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$dest" torchao==0.18.0
du -sh "$dest"
