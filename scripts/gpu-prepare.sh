#!/usr/bin/env bash
# Build what scripts/gpu-check.sh runs on a GPU machine that has no Rust toolchain: the
# release `eptc` and the test binaries of the suites it runs there, stripped, in .gpu/
# (ignored by git; the device tool carries it). Run here, from the repository root:
#
#   bash scripts/gpu-prepare.sh
#
# The GPU machine is x86-64 like this one. It also needs Vulkan's loader for wgpu, which
# the device tool's notes fetch into .gl/ (apt-get download libvulkan1 ...).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
cargo build --release --bin eptc
strip -o .gpu/eptc target/release/eptc
# Test binaries (release): the CLI parity and training suites, the CUDA crate's parity and
# code generator (its GPU tests run every generated and fused kernel against the reference).
json=$(cargo test --release --no-run --message-format=json \
  --test parity --test training -p eptc 2>/dev/null | grep '"executable":"/' || true)
for name in parity training; do
  exe=$(echo "$json" | grep "\"name\":\"$name\"" | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -1)
  [ -n "$exe" ] || { echo "no test binary for $name"; exit 1; }
  strip -o ".gpu/test-$name" "$exe"
done
for t in parity codegen; do
  cargo test --release --no-run -p eptc-cuda --test $t --message-format=json 2>/dev/null \
    | grep -o '"executable":"/[^"]*"' | cut -d'"' -f4 | tail -1 | xargs -I{} strip -o .gpu/test-cuda-$t {}
done
ls -la .gpu
du -sh .gpu .gl 2>/dev/null || true
