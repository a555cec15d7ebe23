#!/usr/bin/env bash
# Put megatron-core 0.19.2 next to the venv's 0.16.1 without touching the venv's copy.
#
# 0.19.x wheels are cp312-only (Requires-Python >=3.12) while the venv is 3.11, so pip
# cannot install it; the megatron/ package itself is pure Python apart from
# datasets/helpers_cpp (a cp312 .so that dist_checkpointing never imports), so unpacking
# it into .mcore019/ and putting that first on PYTHONPATH works.
#
# triton IS needed: 0.19's megatron/core/__init__.py -> distributed -> pipeline_parallel
# -> transformer/moe/paged_stash -> moe/ops/paged_stash.py does an unguarded `import triton`
# (only @triton.jit / tl.constexpr at import time, so any triton 3.x works and no GPU is
# used). An already-importable triton is left alone (a CUDA torch pins its own); otherwise
# TRITON_VERSION (default 3.9.0, the version verified here) is installed into .mcore019/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
DEST="$ROOT/.mcore019"
VERSION="${MCORE_VERSION:-0.19.2}"
TRITON_VERSION="${TRITON_VERSION:-3.9.0}"

if [[ "$(cat "$DEST/.version" 2>/dev/null)" != "$VERSION" ]]; then
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        "megatron-core==$VERSION" -d "$TMP"
    rm -rf "$DEST"
    mkdir -p "$DEST"
    "$PY" - "$TMP"/megatron_core-"$VERSION"-*.whl "$DEST" <<'EOF'
import sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
wheel.extractall(sys.argv[2], [n for n in wheel.namelist() if n.startswith("megatron/")])
EOF
    # package_info.py appends `+<git rev-parse --short HEAD>` of whatever repo it sits in;
    # inside this checkout that is *our* commit ("0.19.2+1a2b3c4"), so switch that off.
    PKG="$DEST/megatron/core/package_info.py"
    grep -q "^if not int(_os.getenv('NO_VCS_VERSION', '0')):" "$PKG"
    sed -i "s/^if not int(_os.getenv('NO_VCS_VERSION', '0')):/if False:  # tools\/mcore019.sh: no VCS suffix/" "$PKG"
    echo "$VERSION" >"$DEST/.version"
fi

if ! PYTHONPATH="$DEST" "$PY" -c "import triton" 2>/dev/null; then
    # Into .mcore019/ beside megatron/, not the venv: the 0.16 suite then runs without triton.
    "$PY" -m pip install -q --no-deps --target "$DEST" "triton==$TRITON_VERSION"
fi

GOT="$(cd "$ROOT" && PYTHONPATH="$DEST:$ROOT" "$PY" -W ignore -c \
    "import megatron.core, megatron.core.dist_checkpointing; print(megatron.core.__version__)")"
if [[ "$GOT" != "$VERSION" ]]; then
    echo "expected megatron-core $VERSION from $DEST, imported $GOT" >&2
    exit 1
fi
echo "megatron-core $GOT ready in $DEST; use it with:"
echo "export PYTHONPATH=\$PWD/.mcore019:\$PWD"
