#!/usr/bin/env bash
# Everything eptc needs a GPU for, in one call (well under 10 minutes), on a machine with
# an NVIDIA GPU, PyTorch + timm and the CUDA 13 driver, but no Rust toolchain:
#
#   here:   bash scripts/gpu-prepare.sh          (release eptc + test binaries -> .gpu/)
#   there:  bash scripts/gpu-check.sh [OUT]      (the device tool carries .gpu and .gl)
#
# 1. the machine: nvidia-smi, `eptc plugins` (the cuda and wgpu backends' devices);
# 2. the CUDA backend's own parity tests against the CPU backend (tiny ViT, f32, bf16),
#    and every generated kernel and fused element-wise chain of the op configurations,
#    tiny graphs and ViT-B/16 against the f64 reference (f32, bf16, f16);
# 3. the workspace's parity suite (every EPT mode, depth and checkpoint layout against
#    PyTorch float64 logits) and gradient suite, run on --target cuda (f32; bf16 too
#    with GPU_SUITE_DTYPES="f32 bf16"), then again with EPTC_CUDA_FUSE=1 (element-wise
#    chains fused), with EPTC_CUDA_ATTENTION=fused (attention as the generated fused
#    kernels, forward -- on the tensor cores in bf16/f16 -- and the flash-style
#    backward) and with EPTC_CUDA_VIEWS=1 (the
#    attention GEMMs read q, k, v in place, no permute / slice copies) and
#    EPTC_CUDA_PINNED=1 (pinned staging for the host copies), and with EPTC_CUDA_LT=1
#    (linear layers' bias and residual in cuBLASLt's epilogue); all off by default until
#    they pass here;
# 4. benches/gpu_compare.py: ViT-B/16 + EPT parity against PyTorch float64 on the GPU,
#    and the side-by-side timing against PyTorch eager and torch.compile (bf16), for the
#    default plan and for `cuda bf16 all` (every switch, at compile and run time);
# 5. with GPU_WGPU=1, the wgpu backend through Vulkan on the same GPU (ViT-B/16
#    forward, batch 1 and 64; measured in GPU runs 1-3, so off by default to keep the
#    call short).
# Each part runs even when an earlier one fails; logs and tables go to OUT (default
# $OUT, else ./gpu-out), the summary table last on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
bin=$PWD/.gpu
[ -x "$bin/eptc" ] || { echo "no .gpu/eptc: run scripts/gpu-prepare.sh first (here)"; exit 1; }
t_start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t_start )) s] $*"; }
# GPU_PARTS="2 3" runs only those parts (default: 2 3 4, and 5 with GPU_WGPU=1), so that a
# session can split the work over two calls on a warm machine.
part() { [ -z "${GPU_PARTS:-}" ] || [[ " $GPU_PARTS " == *" $1 "* ]]; }

# Vulkan's loader (for wgpu), unpacked from the carried Debian packages if the image
# lacks it.
if ! ldconfig -p | grep -q libvulkan.so.1 && ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
fi
export XDG_RUNTIME_DIR=$(mktemp -d)
# NVRTC and cuBLAS from the CUDA wheels next to PyTorch.
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for pat in ("nvidia/cu13/lib/libnvrtc.so*", "nvidia/cu13/lib/libcublas.so*",
                "nvidia/*/lib/libnvrtc.so*", "nvidia/*/lib/libcublas.so*"):
        dirs.update(os.path.dirname(p) for p in glob.glob(os.path.join(sp, pat)))
print(":".join(sorted(dirs)))
PY
)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && libs=${libs:+$libs:}$d
done
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export EPTC_CUDA_CACHE=$PWD/.gpu-cache
stamp "libraries: $libs"

stamp "== 1. machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
"$bin/eptc" plugins 2>&1 | tee "$out/plugins.txt"

if part 2; then
stamp "== 2. cuda backend parity (tiny ViT vs the CPU backend)"
EPTC_REQUIRE_CUDA=1 timeout 60 "$bin/test-cuda-parity" --nocapture --test-threads 1 \
  > "$out/cuda-parity.log" 2>&1; echo "exit $?" >> "$out/cuda-parity.log"
grep -E "error|relative|plan for|test result|panicked|skipped|^exit" "$out/cuda-parity.log" | head -40
EPTC_REQUIRE_CUDA=1 CARGO_MANIFEST_DIR=$PWD/plugins/cuda timeout 150 "$bin/test-cuda-codegen" \
  gpu_kernels_match_the_reference gpu_fused_chains --nocapture --test-threads 1 \
  > "$out/cuda-kernels.log" 2>&1; echo "exit $?" >> "$out/cuda-kernels.log"
grep -E "distinct|worst relative error [0-9.e-]+|test result|panicked|FAILED|^exit" "$out/cuda-kernels.log" \
  | grep -vE "error 0.00e0" | head -40

fi  # part 2

if part 3; then
export EPTC_BIN=$bin/eptc EPTC_FIXTURES=$PWD/tests/fixtures EPTC_TEST_TARGET=cuda
for dt in ${GPU_SUITE_DTYPES:-f32}; do
  stamp "== 3. parity + gradient suites on --target cuda --dtype $dt"
  EPTC_TEST_DTYPE=$dt timeout 100 "$bin/test-parity" --test-threads 8 --nocapture \
    > "$out/suite-parity-$dt.log" 2>&1; echo "exit $?" >> "$out/suite-parity-$dt.log"
  grep -E "test result|FAILED|panicked|^exit" "$out/suite-parity-$dt.log" | head -20
  grep -Eo "rel err [0-9.e+-]+" "$out/suite-parity-$dt.log" | sort -k3 -g | tail -1
  EPTC_TEST_DTYPE=$dt timeout 60 "$bin/test-training" grad_matches_pytorch --nocapture \
    > "$out/suite-grad-$dt.log" 2>&1; echo "exit $?" >> "$out/suite-grad-$dt.log"
  grep -E "worst|test result|panicked|prompts: relative|^exit" "$out/suite-grad-$dt.log" | head -14
done
stamp "== 3b. the same suites with element-wise chains fused (EPTC_CUDA_FUSE=1), f32"
EPTC_CUDA_FUSE=1 timeout 100 "$bin/test-parity" --test-threads 8 --nocapture \
  > "$out/suite-parity-fused.log" 2>&1; echo "exit $?" >> "$out/suite-parity-fused.log"
grep -E "test result|FAILED|panicked|^exit" "$out/suite-parity-fused.log" | head -20
grep -Eo "rel err [0-9.e+-]+" "$out/suite-parity-fused.log" | sort -k3 -g | tail -1
EPTC_CUDA_FUSE=1 timeout 60 "$bin/test-training" grad_matches_pytorch --nocapture \
  > "$out/suite-grad-fused.log" 2>&1; echo "exit $?" >> "$out/suite-grad-fused.log"
grep -E "worst|test result|panicked|prompts: relative|^exit" "$out/suite-grad-fused.log" | head -14
stamp "== 3c. the gradient suite with the fused attention kernels, backward included (EPTC_CUDA_ATTENTION=fused), f32 and bf16"
EPTC_CUDA_ATTENTION=fused timeout 90 "$bin/test-training" grad_matches_pytorch --nocapture \
  > "$out/suite-grad-fused-attention.log" 2>&1; echo "exit $?" >> "$out/suite-grad-fused-attention.log"
grep -E "worst|test result|panicked|prompts: relative|^exit" "$out/suite-grad-fused-attention.log" | head -14
# The same in bf16: the backward's attention_grad on the tensor cores. The 16-bit bar
# of each case is twice PyTorch's own bf16 error there (tests/fixtures/
# grad_half_errors.json), at least 5e-2; on the emulated runtime this passes (multi-cat
# up to 6.5e-2 against a bar of 7.8e-2, with lse and delta in f32: benches/RESULTS.md).
EPTC_CUDA_ATTENTION=fused EPTC_TEST_DTYPE=bf16 timeout 90 "$bin/test-training" grad_matches_pytorch --nocapture \
  > "$out/suite-grad-fused-attention-bf16.log" 2>&1; echo "exit $?" >> "$out/suite-grad-fused-attention-bf16.log"
grep -E "worst|test result|panicked|prompts: relative|^exit" "$out/suite-grad-fused-attention-bf16.log" | head -14
# The tensor-core attention forward (bf16 storage) in whole optimized graphs, reading q,
# k, v in place: the parity suite (every EPT mode and layout, the fixtures' heads of 16)
# against PyTorch float64.
EPTC_CUDA_ATTENTION=fused EPTC_CUDA_VIEWS=1 EPTC_TEST_DTYPE=bf16 timeout 100 "$bin/test-parity" --test-threads 8 --nocapture \
  > "$out/suite-parity-fused-attention-bf16.log" 2>&1; echo "exit $?" >> "$out/suite-parity-fused-attention-bf16.log"
grep -E "test result|FAILED|panicked|^exit" "$out/suite-parity-fused-attention-bf16.log" | head -20
grep -Eo "rel err [0-9.e+-]+" "$out/suite-parity-fused-attention-bf16.log" | sort -k3 -g | tail -1
stamp "== 3d. the parity and gradient suites with operands read in place and pinned staging (EPTC_CUDA_VIEWS=1 EPTC_CUDA_PINNED=1), f32"
EPTC_CUDA_VIEWS=1 EPTC_CUDA_PINNED=1 timeout 100 "$bin/test-parity" --test-threads 8 --nocapture \
  > "$out/suite-parity-views.log" 2>&1; echo "exit $?" >> "$out/suite-parity-views.log"
grep -E "test result|FAILED|panicked|^exit" "$out/suite-parity-views.log" | head -20
grep -Eo "rel err [0-9.e+-]+" "$out/suite-parity-views.log" | sort -k3 -g | tail -1
EPTC_CUDA_VIEWS=1 EPTC_CUDA_PINNED=1 timeout 60 "$bin/test-training" grad_matches_pytorch --nocapture \
  > "$out/suite-grad-views.log" 2>&1; echo "exit $?" >> "$out/suite-grad-views.log"
grep -E "worst|test result|panicked|prompts: relative|^exit" "$out/suite-grad-views.log" | head -14
unset EPTC_TEST_DTYPE EPTC_TEST_TARGET

stamp "== 3e. the parity suite with the linear layers' bias and residual on cuBLASLt (EPTC_CUDA_LT=1), f32 and bf16"
for dt in f32 bf16; do
  EPTC_CUDA_LT=1 EPTC_TEST_TARGET=cuda EPTC_TEST_DTYPE=$dt timeout 100 "$bin/test-parity" --test-threads 8 --nocapture \
    > "$out/suite-parity-lt-$dt.log" 2>&1; echo "exit $?" >> "$out/suite-parity-lt-$dt.log"
  grep -E "test result|FAILED|panicked|cuBLASLt|^exit" "$out/suite-parity-lt-$dt.log" | head -10
  grep -Eo "rel err [0-9.e+-]+" "$out/suite-parity-lt-$dt.log" | sort -k3 -g | tail -1
done
EPTC_CUDA_LT=1 "$bin/eptc" plugins 2>&1 | grep -i cuda | head -3

fi  # part 3

if part 4; then
stamp "== 4. ViT-B/16: parity against PyTorch float64 and timing against PyTorch"
PYTHONUNBUFFERED=1 timeout ${GPU_COMPARE_TIMEOUT:-260} python3 benches/gpu_compare.py \
  --eptc "$bin/eptc" --work /tmp/eptc-gpu --out "$out" \
  --targets "cuda:f32,cuda:bf16,cuda:f16,cuda:bf16:all${GPU_COMPARE_WGPU:+,wgpu:f32}" ${GPU_COMPARE_ARGS:-} \
  > "$out/gpu_compare.log" 2>&1; echo "exit $?" >> "$out/gpu_compare.log"
tail -5 "$out/gpu_compare.log"

stamp "== 4b. attention as cuBLAS GEMMs (default) or the fused kernel, element-wise chains fused or not; where the time goes"
# The switches of a timing mode such as "fused+views+lt" (attention mode first).
mode_env() {
  local m=$1 on
  echo "EPTC_CUDA_ATTENTION=${m%%+*}"
  for sw in fuse:FUSE views:VIEWS pinned:PINNED lt:LT; do
    on=0; [[ "+$m+" == *"+${sw%%:*}+"* ]] && on=1
    echo "EPTC_CUDA_${sw#*:}=$on"
  done
}
if [ -d /tmp/eptc-gpu/art_cuda_bf16 ]; then
  for mode in ${GPU_MODES:-gemm fused fused+views gemm+fuse gemm+views gemm+lt gemm+fuse+views+pinned fused+fuse+views+pinned+lt}; do
    for tr in "" --train; do
      env $(mode_env $mode) timeout 30 "$bin/eptc" bench /tmp/eptc-gpu/art_cuda_bf16 \
        --batch 64 --iters 10 --warmup 2 $tr --json 2>>"$out/attention-modes.err" | python3 -c "
import json, sys; r = json.loads(sys.stdin.read()); d = r.get('device_median_s') or float('nan')
print(f'  mode={sys.argv[1]:26} {r[\"what\"]:13} b64 bf16: device {d*1e3:.2f} ms, wall {r[\"median_s\"]*1e3:.2f} ms')" $mode
    done
  done 2>&1 | tee "$out/attention-modes.txt"
  # Inference at the goal's batch (256): the default and the tensor-core fused forward.
  for mode in gemm fused+fuse+views+pinned+lt; do
    env $(mode_env $mode) timeout 40 "$bin/eptc" bench /tmp/eptc-gpu/art_cuda_bf16 \
      --batch 256 --iters 10 --warmup 2 --json 2>>"$out/attention-modes.err" | python3 -c "
import json, sys; r = json.loads(sys.stdin.read()); d = r.get('device_median_s') or float('nan')
print(f'  mode={sys.argv[1]:26} {r[\"what\"]:13} b256 bf16: device {d*1e3:.2f} ms ({256/d:.0f} img/s), wall {r[\"median_s\"]*1e3:.2f} ms')" $mode
  done 2>&1 | tee -a "$out/attention-modes.txt"
  # The training step with the fused attention backward needs an artifact compiled with
  # it (the training graph then holds attention_lse / attention_grad).
  EPTC_CUDA_ATTENTION=fused timeout 60 "$bin/eptc" compile /tmp/eptc-gpu/vit_b16_timm.safetensors \
    --peft ept --prompt-len 100 --num-classes 10 --target cuda --dtype bf16 \
    -o /tmp/eptc-gpu/art_cuda_bf16_fused >/dev/null 2>>"$out/attention-modes.err" \
  && for fv in 0,0 1,1; do
    fuse=${fv%,*}; views=${fv#*,}
    EPTC_CUDA_ATTENTION=fused EPTC_CUDA_FUSE=$fuse EPTC_CUDA_VIEWS=$views timeout 40 "$bin/eptc" bench /tmp/eptc-gpu/art_cuda_bf16_fused \
      --batch 64 --iters 10 --warmup 2 --train --json 2>>"$out/attention-modes.err" | python3 -c "
import json, sys; r = json.loads(sys.stdin.read()); d = r.get('device_median_s') or float('nan')
print(f'  mode=fused backward, fuse={sys.argv[1]} views={sys.argv[2]} {r[\"what\"]:13} b64 bf16: device {d*1e3:.2f} ms, wall {r[\"median_s\"]*1e3:.2f} ms, eptc peak {(r.get(\"device_peak_bytes\") or 0)/2**20:.0f} MiB')" $fuse $views
  done 2>&1 | tee -a "$out/attention-modes.txt"
  # The training step that recomputes the MLP's pre-activation (EPTC_CUDA_RECOMPUTE=1 at
  # compile) with every switch: planned on the emulator at 1697 MiB against PyTorch
  # eager's 3433 (run 3), the memory goal being half of eager's; what does it cost?
  EPTC_CUDA_ATTENTION=fused EPTC_CUDA_RECOMPUTE=1 timeout 60 "$bin/eptc" compile /tmp/eptc-gpu/vit_b16_timm.safetensors \
    --peft ept --prompt-len 100 --num-classes 10 --target cuda --dtype bf16 \
    -o /tmp/eptc-gpu/art_cuda_bf16_recompute >/dev/null 2>>"$out/attention-modes.err" \
  && env $(mode_env fused+fuse+views+pinned+lt) timeout 40 "$bin/eptc" bench /tmp/eptc-gpu/art_cuda_bf16_recompute \
      --batch 64 --iters 10 --warmup 2 --train --json 2>>"$out/attention-modes.err" | python3 -c "
import json, sys; r = json.loads(sys.stdin.read()); d = r.get('device_median_s') or float('nan')
print(f'  mode=fused backward, recompute, all switches {r[\"what\"]:13} b64 bf16: device {d*1e3:.2f} ms, wall {r[\"median_s\"]*1e3:.2f} ms, eptc peak {(r.get(\"device_peak_bytes\") or 0)/2**20:.0f} MiB')" \
    2>&1 | tee -a "$out/attention-modes.txt"
  EPTC_CUDA_PROFILE=1 timeout 30 "$bin/eptc" bench /tmp/eptc-gpu/art_cuda_bf16 --batch 64 \
    --iters 1 --warmup 1 > "$out/profile.log" 2>&1; echo "exit $?" >> "$out/profile.log"
  grep -A14 "eptc cuda profile" "$out/profile.log" | tail -15
  # Where the training step's time goes (default, and with every switch on).
  EPTC_CUDA_PROFILE=1 timeout 30 "$bin/eptc" bench /tmp/eptc-gpu/art_cuda_bf16 --batch 64 --train \
    --iters 1 --warmup 1 > "$out/profile-train.log" 2>&1; echo "exit $?" >> "$out/profile-train.log"
  grep -A14 "eptc cuda profile" "$out/profile-train.log" | tail -15
  EPTC_CUDA_PROFILE=1 EPTC_CUDA_ATTENTION=fused EPTC_CUDA_FUSE=1 EPTC_CUDA_VIEWS=1 timeout 30 "$bin/eptc" bench \
    /tmp/eptc-gpu/art_cuda_bf16 --batch 64 --iters 1 --warmup 1 > "$out/profile-fused.log" 2>&1
  echo "exit $?" >> "$out/profile-fused.log"
  grep -A14 "eptc cuda profile" "$out/profile-fused.log" | tail -15
fi

fi  # part 4

stamp "== 5. wgpu on this GPU through Vulkan (ViT-B/16 forward)"
if [ -n "${GPU_WGPU:-}" ] && [ -d /tmp/eptc-gpu ] && [ -f /tmp/eptc-gpu/vit_b16_timm.safetensors ]; then
  (timeout 20 "$bin/eptc" compile /tmp/eptc-gpu/vit_b16_timm.safetensors --peft ept \
     --prompt-len 100 --num-classes 10 --target wgpu -o /tmp/eptc-gpu/art_wgpu \
   && for b in 1 64; do timeout 30 "$bin/eptc" bench /tmp/eptc-gpu/art_wgpu --batch $b \
        --iters 5 --warmup 1; done) > "$out/wgpu.log" 2>&1; echo "exit $?" >> "$out/wgpu.log"
  cat "$out/wgpu.log" | grep -v "^\s*$" | tail -12
fi

stamp "== summary"
cat "$out/gpu_compare.md" 2>/dev/null || echo "(no gpu_compare.md)"
stamp "done"
