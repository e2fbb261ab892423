//! The CPU emulator of the generated kernels (`eptc_cuda::emulate`) on small hand-written
//! kernels: barriers, shuffles and shared memory behave as on a GPU, and the mistakes it
//! exists to catch are caught (a missing barrier, a write past a buffer or into an
//! operand, an unwritten output element, a barrier that cannot release, a shuffle with a
//! lane that has returned). `codegen.rs` runs every generated kernel through it.

use eptc_cuda::codegen::Kernel;
use eptc_cuda::emulate::{self, Module};
use eptc_ir::DType;

fn emulator() -> bool {
    match emulate::available() {
        Ok(_) => true,
        Err(e) if std::env::var_os("EPTC_REQUIRE_EMULATOR").is_some() => {
            panic!("EPTC_REQUIRE_EMULATOR is set, but: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn kernel(name: &str, inputs: usize, body: &str, grid: u32, block: u32) -> Kernel {
    let mut params: Vec<String> = (0..inputs)
        .map(|i| format!("const T* __restrict__ x{i}"))
        .collect();
    params.push("T* __restrict__ out".into());
    Kernel {
        name: name.into(),
        source: format!(
            "extern \"C\" __global__ void {name}({}) {{\n{body}\n}}\n",
            params.join(", ")
        ),
        inputs,
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_bytes: 0,
    }
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn back(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

const WARP_SUMS: &str = "    const float v = ld(x0, blockIdx.x * 64u + threadIdx.x);
    const float s = warp_sum(v);
    if ((threadIdx.x & 31u) == 0u) st(out, blockIdx.x * 2u + (threadIdx.x >> 5), s);";

/// Thread t of a block writes shared slot t; thread t then reads slot (t + 1) % 64.
fn rotate(sync: bool) -> String {
    format!(
        "    __shared__ float s[64];
    s[threadIdx.x] = ld(x0, blockIdx.x * 64u + threadIdx.x);
    {}
    st(out, blockIdx.x * 64u + threadIdx.x, s[(threadIdx.x + 1u) % 64u]);",
        if sync { "__syncthreads();" } else { "" }
    )
}

#[test]
fn shuffles_barriers_and_shared_memory_work() {
    if !emulator() {
        return;
    }
    let ks = [
        kernel("warp_sums", 1, WARP_SUMS, 3, 64),
        kernel("rotate", 1, &rotate(true), 3, 64),
    ];
    let m = Module::compile(&ks.iter().collect::<Vec<_>>(), DType::F32).unwrap();
    let x: Vec<f32> = (0..192).map(|i| (i as f32 * 0.37).sin()).collect();
    let got = back(&m.run(&ks[0], &[&f32s(&x)], 6 * 4).unwrap());
    for (w, g) in got.iter().enumerate() {
        let want: f32 = x[w * 32..w * 32 + 32].iter().sum();
        assert!(
            (g - want).abs() <= 1e-5 * want.abs().max(1.0),
            "warp {w}: {g} vs {want}"
        );
    }
    let got = back(&m.run(&ks[1], &[&f32s(&x)], 192 * 4).unwrap());
    for b in 0..3 {
        for t in 0..64 {
            assert_eq!(
                got[b * 64 + t],
                x[b * 64 + (t + 1) % 64],
                "block {b} thread {t}"
            );
        }
    }
}

#[test]
fn mistakes_are_caught() {
    if !emulator() {
        return;
    }
    let ks = [
        // No barrier between the shared writes and the reads of other threads' slots.
        kernel("no_barrier", 1, &rotate(false), 2, 64),
        kernel(
            "past_the_end",
            1,
            "    st(out, threadIdx.x + 1u, ld(x0, threadIdx.x));",
            1,
            32,
        ),
        kernel(
            "into_operand",
            1,
            "    ((T*)x0)[threadIdx.x] = 0.0f;\n    st(out, threadIdx.x, 1.0f);",
            1,
            32,
        ),
        kernel(
            "skips_one",
            1,
            "    if (threadIdx.x != 5u) st(out, threadIdx.x, ld(x0, threadIdx.x));",
            1,
            32,
        ),
        kernel(
            "stuck",
            0,
            "    if (threadIdx.x >= 48u) __syncwarp();\n    __syncthreads();\n    st(out, threadIdx.x, 1.0f);",
            1,
            64,
        ),
        kernel(
            "returned_lane",
            0,
            "    if ((threadIdx.x & 31u) >= 16u) return;\n    const float v = __shfl_xor_sync(0xffffffffu, 1.0f, 16);\n    st(out, threadIdx.x, v);",
            1,
            32,
        ),
    ];
    let m = Module::compile(&ks.iter().collect::<Vec<_>>(), DType::F32).unwrap();
    let x: Vec<f32> = (0..128).map(|i| i as f32).collect();
    let xb = f32s(&x);

    // Reads before the other threads wrote: the NaN shared memory shows in the output.
    let got = back(&m.run(&ks[0], &[&xb], 128 * 4).unwrap());
    assert!(got.iter().any(|v| v.is_nan()), "{got:?}");

    let e = m.run(&ks[1], &[&xb[..32 * 4]], 32 * 4).unwrap_err();
    assert!(e.contains("past the end of the output"), "{e}");

    let e = m.run(&ks[2], &[&xb[..32 * 4]], 32 * 4).unwrap_err();
    assert!(e.contains("wrote into operand 0"), "{e}");

    let got = back(&m.run(&ks[3], &[&xb[..32 * 4]], 32 * 4).unwrap());
    assert!(got[5].is_nan() && got.iter().filter(|v| v.is_nan()).count() == 1);

    let e = m.run(&ks[4], &[], 64 * 4).unwrap_err();
    assert!(e.contains("cannot release"), "{e}");

    let e = m.run(&ks[5], &[], 32 * 4).unwrap_err();
    assert!(e.contains("not in the same shuffle"), "{e}");
}

#[test]
fn storage_types_round_as_the_gpu_does() {
    if !emulator() {
        return;
    }
    // Copies through ld/st: bf16 and f16 values come back bit for bit.
    let k = kernel(
        "copy",
        1,
        "    st(out, threadIdx.x, ld(x0, threadIdx.x) * 1.5f);",
        1,
        32,
    );
    for dtype in [DType::BF16, DType::F16] {
        let m = Module::compile(&[&k], dtype).unwrap();
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.173).collect();
        let bytes: Vec<u8> = match dtype {
            DType::BF16 => x
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            _ => x
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        let out = m.run(&k, &[&bytes], 64).unwrap();
        for i in 0..32 {
            let (got, want) = match dtype {
                DType::BF16 => {
                    let held = half::bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
                    (
                        half::bf16::from_le_bytes([out[2 * i], out[2 * i + 1]]).to_bits(),
                        half::bf16::from_f32(held.to_f32() * 1.5).to_bits(),
                    )
                }
                _ => {
                    let held = half::f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
                    (
                        half::f16::from_le_bytes([out[2 * i], out[2 * i + 1]]).to_bits(),
                        half::f16::from_f32(held.to_f32() * 1.5).to_bits(),
                    )
                }
            };
            assert_eq!(got, want, "{dtype} element {i}");
        }
    }
}

/// `mma_t` (one `mma.m16n8k16`) with the fragments loaded as the PTX ISA states them, per
/// element `a_i` / `b_i` / `c_i` (not per register, as the shim and the attention kernel
/// index them): D = A B for a 16 x 16 A and a 16 x 8 B, in bf16 and f16. A warp with a
/// lane missing from the product is an error.
#[test]
fn mma_follows_the_ptx_fragment_layouts() {
    if !emulator() {
        return;
    }
    let body = |early: bool| {
        format!(
            "    const unsigned lane = threadIdx.x, g = lane >> 2, t = lane & 3u;
    unsigned a[4], b[2];
    for (int r = 0; r < 4; ++r) {{
        unsigned short e[2];
        for (int h = 0; h < 2; ++h) {{
            const int i = 2 * r + h;
            const unsigned row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8u;
            const unsigned col = t * 2u + (unsigned)(i & 1) + (i >= 4 ? 8u : 0u);
            e[h] = x0[row * 16u + col];
        }}
        a[r] = (unsigned)e[0] | ((unsigned)e[1] << 16);
    }}
    for (int r = 0; r < 2; ++r) {{
        unsigned short e[2];
        for (int h = 0; h < 2; ++h) {{
            const int i = 2 * r + h;
            const unsigned row = t * 2u + (unsigned)(i & 1) + (i >= 2 ? 8u : 0u);
            e[h] = x1[row * 8u + g];
        }}
        b[r] = (unsigned)e[0] | ((unsigned)e[1] << 16);
    }}
    float d[4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
    {}
    mma_t(d, a, b);
    for (int i = 0; i < 4; ++i) {{
        const unsigned row = i < 2 ? g : g + 8u, col = t * 2u + (unsigned)(i & 1);
        st(out, row * 8u + col, d[i]);
    }}",
            if early {
                "if (lane == 31u) return;"
            } else {
                ""
            }
        )
    };
    let ks = [
        kernel("mma", 2, &body(false), 1, 32),
        kernel("mma_lane_missing", 2, &body(true), 1, 32),
    ];
    let a: Vec<f32> = (0..256)
        .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.125)
        .collect();
    let b: Vec<f32> = (0..128)
        .map(|i| ((i * 5 % 19) as f32 - 9.0) * 0.25)
        .collect();
    for dtype in [DType::BF16, DType::F16] {
        let m = Module::compile(&ks.iter().collect::<Vec<_>>(), dtype).unwrap();
        // Small multiples of 1/8: exact in both types, and so is every product and sum.
        let store = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| match dtype {
                    DType::BF16 => half::bf16::from_f32(x).to_le_bytes(),
                    _ => half::f16::from_f32(x).to_le_bytes(),
                })
                .collect()
        };
        let out = m
            .run(&ks[0], &[&store(&a), &store(&b)], 16 * 8 * 2)
            .unwrap();
        for r in 0..16 {
            for c in 0..8 {
                let want: f32 = (0..16).map(|k| a[r * 16 + k] * b[k * 8 + c]).sum();
                let bytes = [out[2 * (r * 8 + c)], out[2 * (r * 8 + c) + 1]];
                let got = match dtype {
                    DType::BF16 => half::bf16::from_le_bytes(bytes).to_f32(),
                    _ => half::f16::from_le_bytes(bytes).to_f32(),
                };
                let want = match dtype {
                    DType::BF16 => half::bf16::from_f32(want).to_f32(),
                    _ => half::f16::from_f32(want).to_f32(),
                };
                assert_eq!(got, want, "{dtype} D[{r}][{c}]");
            }
        }
        let e = m
            .run(&ks[1], &[&store(&a), &store(&b)], 16 * 8 * 2)
            .unwrap_err();
        assert!(e.contains("mma with a lane of the warp missing"), "{e}");
    }
}
