#!/usr/bin/env bash
# Test-only reference for the melody tests: transformers' MusicgenMelodyFeatureExtractor imports torchaudio.
# No torchaudio wheel is built for this torch, so 2.11.1 goes in without its dependencies, and its compiled
# extensions (which need CUDA libraries) are removed: the plain torch code the extractor uses works without them.
set -euo pipefail
python -m pip install --no-deps torchaudio==2.11.1
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$site"/torchaudio/lib/*.so
python -c 'import torchaudio.functional, torchaudio.transforms'
