// eptc's CUDA emulator: the CUDA C that eptc generates, compiled by the host's C++
// compiler and run on the CPU. Every thread of a block is a fiber (ucontext) with its own
// stack; the fibers of one block run one at a time, each until it reaches a barrier
// (__syncthreads, __syncwarp, a warp shuffle) or returns, and a barrier releases when
// every thread of its block (or warp) that has not returned waits at it. Blocks run one
// after another. Static shared memory lives in the `eptc_shared` section and is filled
// with NaN bytes (0xff) before each block, so a read before any write shows. A shuffle
// that reads a lane which did not take part in the same shuffle, and a barrier that can
// never release, are errors.
//
// What it does not show: timing, data races between blocks that a sequential order
// hides, and code that relies on the hardware's warp lock-step.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ucontext.h>

#define __global__
#define __device__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static __attribute__((section("eptc_shared")))

struct dim3 {
    unsigned x, y, z;
};
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};

extern "C" __attribute__((weak)) char __start_eptc_shared[];
extern "C" __attribute__((weak)) char __stop_eptc_shared[];

namespace eptc_emu {

enum State { RUN, WAIT_BLOCK, WAIT_WARP, DONE };

const unsigned MAX_THREADS = 1024;
const size_t STACK = 128 * 1024;

struct Fiber {
    ucontext_t ctx;
    State state;
    dim3 tid;
    unsigned lin;
    unsigned long long shuffles;
};

static Fiber fibers[MAX_THREADS];
static char* stacks[MAX_THREADS];
static Fiber* cur = nullptr;
static ucontext_t sched;
static void (*thunk)(void**) = nullptr;
static void** thunk_args = nullptr;
static char failure[512];
static bool failed = false;
// Warp shuffles: the value each lane offers and which of its shuffles it belongs to.
static unsigned long long slot[MAX_THREADS / 32][32];
static unsigned long long slot_gen[MAX_THREADS / 32][32];

static void wait(State s) {
    cur->state = s;
    swapcontext(&cur->ctx, &sched);
}

static void fail(const char* msg) {
    if (!failed) {
        snprintf(failure, sizeof failure, "thread (%u, %u, %u): %s", cur->tid.x, cur->tid.y,
                 cur->tid.z, msg);
        failed = true;
    }
    cur->state = DONE;
    swapcontext(&cur->ctx, &sched);
    abort();  // never resumed
}

static void entry() {
    thunk(thunk_args);
    cur->state = DONE;
}

}  // namespace eptc_emu

static dim3 blockIdx, blockDim, gridDim;
#define threadIdx (eptc_emu::cur->tid)

static inline void __syncthreads() { eptc_emu::wait(eptc_emu::WAIT_BLOCK); }
static inline void __syncwarp(unsigned = 0xffffffffu) { eptc_emu::wait(eptc_emu::WAIT_WARP); }

template <class V>
static inline V __shfl_xor_sync(unsigned, V v, int mask) {
    using namespace eptc_emu;
    static_assert(sizeof(V) <= 8, "a shuffled value fits in 8 bytes");
    const unsigned lane = cur->lin & 31u, warp = cur->lin >> 5;
    const unsigned long long gen = ++cur->shuffles;
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(V));
    slot[warp][lane] = bits;
    slot_gen[warp][lane] = gen;
    wait(WAIT_WARP);
    const unsigned src = lane ^ (unsigned)(mask & 31);
    if (slot_gen[warp][src] != gen) {
        fail("__shfl_xor_sync reads a lane that is not in the same shuffle");
    }
    V r;
    bits = slot[warp][src];
    memcpy(&r, &bits, sizeof(V));
    wait(WAIT_WARP);
    return r;
}

// `reinterpret_cast<V*>(p)` for a vector type `V` (the emulator rewrites the casts): a
// pointer not aligned to V is an error, as the GPU's "misaligned address" fault.
template <class V, class P>
static inline V* eptc_emu_vec_cast(P* p) {
    if (reinterpret_cast<uintptr_t>(p) % alignof(V) != 0) {
        eptc_emu::fail("a vector access through a misaligned pointer");
    }
    return reinterpret_cast<V*>(p);
}

static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float eptc_emu_half_to_float(unsigned short h) {
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}
static inline unsigned short eptc_emu_float_to_half(float f) {
    const _Float16 v = (_Float16)f;
    unsigned short h;
    memcpy(&h, &v, 2);
    return h;
}

// One warp's `mma.m16n8k16` with f32 accumulation (`bf16`: operands in bf16, else f16):
// every lane offers its fragments, then computes its four accumulators from the whole
// A (16 x 16) and B (16 x 8) in the PTX ISA's fragment layouts (g = lane / 4, t = lane %
// 4): A register r of lane (g, t) holds row g + 8 (r & 1), columns 2t + 8 (r >> 1) and
// the next one (high half); B register r holds rows 2t + 8 r and the next one, column g;
// accumulator i is row g + 8 (i >> 1), column 2t + (i & 1). All 32 lanes must take part.
namespace eptc_emu {
static unsigned mma_a[MAX_THREADS / 32][32][4];
static unsigned mma_b[MAX_THREADS / 32][32][2];
}  // namespace eptc_emu

static inline void eptc_emu_mma(float* d, const unsigned* a, const unsigned* b, int bf16) {
    using namespace eptc_emu;
    const unsigned lane = cur->lin & 31u, warp = cur->lin >> 5;
    const unsigned long long gen = ++cur->shuffles;
    memcpy(mma_a[warp][lane], a, sizeof mma_a[warp][lane]);
    memcpy(mma_b[warp][lane], b, sizeof mma_b[warp][lane]);
    slot_gen[warp][lane] = gen;
    wait(WAIT_WARP);
    for (unsigned l = 0; l < 32; ++l) {
        if (slot_gen[warp][l] != gen) {
            fail("mma with a lane of the warp missing");
        }
    }
    auto half = [&](unsigned reg, unsigned hi) -> float {
        const unsigned short h = (unsigned short)(hi ? reg >> 16 : reg & 0xffffu);
        return bf16 ? __uint_as_float((unsigned)h << 16) : eptc_emu_half_to_float(h);
    };
    auto A = [&](unsigned r, unsigned c) {
        const unsigned l = (r % 8) * 4 + (c % 8) / 2;
        return half(mma_a[warp][l][(r / 8) + 2 * (c / 8)], c & 1);
    };
    auto B = [&](unsigned r, unsigned c) {
        const unsigned l = c * 4 + (r % 8) / 2;
        return half(mma_b[warp][l][r / 8], r & 1);
    };
    const unsigned g = lane >> 2, t = lane & 3u;
    float out[4];
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float acc = d[i];
        for (unsigned k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        out[i] = acc;
    }
    // Nobody overwrites the fragments before every lane has read them.
    wait(WAIT_WARP);
    memcpy(d, out, sizeof out);
}

// Run `k(args)` over the grid; 0 on success, else 1 with the reason in `err`.
extern "C" int eptc_emu_launch(void (*k)(void**), void** args, const unsigned* grid,
                               const unsigned* block, char* err, unsigned errlen) {
    using namespace eptc_emu;
    const unsigned nt = block[0] * block[1] * block[2];
    if (nt == 0 || nt > MAX_THREADS || nt % 32 != 0) {
        snprintf(err, errlen, "a block of %u threads (the emulator takes whole warps, at most %u)",
                 nt, MAX_THREADS);
        return 1;
    }
    for (unsigned t = 0; t < nt; ++t) {
        if (!stacks[t]) {
            stacks[t] = (char*)malloc(STACK);
            if (!stacks[t]) {
                snprintf(err, errlen, "out of memory for fiber stacks");
                return 1;
            }
        }
    }
    thunk = k;
    thunk_args = args;
    failed = false;
    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block[0], block[1], block[2]};
    const unsigned nwarps = nt / 32;
    for (unsigned bz = 0; bz < grid[2]; ++bz)
        for (unsigned by = 0; by < grid[1]; ++by)
            for (unsigned bx = 0; bx < grid[0]; ++bx) {
                blockIdx = dim3{bx, by, bz};
                if (__start_eptc_shared && __stop_eptc_shared) {
                    memset(__start_eptc_shared, 0xff, __stop_eptc_shared - __start_eptc_shared);
                }
                memset(slot_gen, 0, sizeof slot_gen);
                for (unsigned t = 0; t < nt; ++t) {
                    Fiber& f = fibers[t];
                    f.lin = t;
                    f.tid = dim3{t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
                    f.state = RUN;
                    f.shuffles = 0;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = stacks[t];
                    f.ctx.uc_stack.ss_size = STACK;
                    f.ctx.uc_link = &sched;
                    makecontext(&f.ctx, entry, 0);
                }
                for (;;) {
                    bool ran = false;
                    for (unsigned t = 0; t < nt; ++t) {
                        if (fibers[t].state == RUN) {
                            cur = &fibers[t];
                            swapcontext(&sched, &fibers[t].ctx);
                            ran = true;
                            if (failed) {
                                snprintf(err, errlen, "block (%u, %u, %u), %s", bx, by, bz, failure);
                                return 1;
                            }
                        }
                    }
                    if (ran) continue;
                    bool released = false;
                    for (unsigned w = 0; w < nwarps; ++w) {
                        unsigned live = 0, waiting = 0;
                        for (unsigned t = w * 32; t < w * 32 + 32; ++t) {
                            live += fibers[t].state != DONE;
                            waiting += fibers[t].state == WAIT_WARP;
                        }
                        if (live > 0 && waiting == live) {
                            for (unsigned t = w * 32; t < w * 32 + 32; ++t) {
                                if (fibers[t].state == WAIT_WARP) fibers[t].state = RUN;
                            }
                            released = true;
                        }
                    }
                    if (released) continue;
                    unsigned live = 0, waiting = 0, warp_waiting = 0;
                    for (unsigned t = 0; t < nt; ++t) {
                        live += fibers[t].state != DONE;
                        waiting += fibers[t].state == WAIT_BLOCK;
                        warp_waiting += fibers[t].state == WAIT_WARP;
                    }
                    if (live == 0) break;
                    if (waiting == live) {
                        for (unsigned t = 0; t < nt; ++t) fibers[t].state = RUN;
                        continue;
                    }
                    snprintf(err, errlen,
                             "block (%u, %u, %u): the barriers cannot release (%u threads at "
                             "__syncthreads, %u at a warp barrier, %u returned)",
                             bx, by, bz, waiting, warp_waiting, nt - live);
                    return 1;
                }
            }
    return 0;
}
