#!/bin/sh
# Build the probe module into bench/extension_probe/build/ (git-ignored). Needs cmake >= 3.25, a C++20 compiler,
# nanobind (pip install nanobind==2.15.0, the version mlx's examples/extensions pin) and the mlx wheel.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
cmake -S "$here" -B "$here/build" -DPython_EXECUTABLE="$(command -v "$python")" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$here/build" -j "${JOBS:-2}"
