// Just enough of CUDA to run cuda_layer.cu's kernel on the CPU, for tests on machines without a GPU: a block's
// CUDA threads are fibers (ucontext) on the calling thread, each running until its next __syncthreads or its end;
// when every live one has arrived, the next phase starts. Phases run the threads in turn, forwards and backwards
// alternately, so a read of shared memory that a missing barrier leaves unordered sees the other thread's value
// in one phase order or the other. Blocks run one at a time, in grid order. MINING_CUDA_EMULATE_FLIP=1 reverses
// both (the blocks, and which phases run backwards), so that a test run once each way sees every phase in both
// orders (tests/test_cuda_sanitized.py). (An OS thread per CUDA thread with a std::barrier, the first
// version, spent most of its time creating and waking threads: tests/test_cuda_layer.py and test_cuda_build.py
// took 168 s on 2 cores with it, 45 s with fibers. Removing any one of three __syncthreads of the layer kernel
// fails test_cuda_layer.py with fibers.)
#pragma once
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ucontext.h>
#include <vector>

struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
inline emu_dim3 threadIdx, blockIdx, blockDim, gridDim;  // threadIdx: set as each fiber resumes
inline unsigned char* emu_smem = nullptr;

struct emu_fiber {
    ucontext_t ctx;
    bool done = false;
};
inline ucontext_t emu_main;
inline emu_fiber* emu_running = nullptr;
inline const std::function<void()>* emu_body = nullptr;

inline void emu_sync() { swapcontext(&emu_running->ctx, &emu_main); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static  // one instance for all threads; blocks run one at a time
#define __syncthreads() emu_sync()

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __fmul_rn(float a, float b) { return a * b; }  // x86-64: SSE, rounded to nearest
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int32_t atomicAdd(int32_t* p, int32_t v) { int32_t old = *p; *p += v; return old; }  // one thread runs
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    unsigned long long old = *p;
    *p += v;
    return old;
}
using std::isfinite;
using std::isnan;

inline void emu_entry() {
    (*emu_body)();
    emu_running->done = true;  // returning resumes emu_main (uc_link)
}

inline void emu_launch(unsigned gx, unsigned gy, unsigned threads, int64_t smem, const std::function<void()>& body) {
    constexpr size_t STACK = 64 * 1024;
    std::vector<unsigned char> shared((size_t)smem + 16);
    std::vector<unsigned char> stacks((size_t)threads * STACK);
    std::vector<emu_fiber> fibers(threads);
    blockDim.x = threads;
    gridDim.x = gx;
    gridDim.y = gy;
    emu_body = &body;
    const char* flip_env = std::getenv("MINING_CUDA_EMULATE_FLIP");
    const bool flip = flip_env && flip_env[0] == '1';
    for (unsigned by_ = 0; by_ < gy; ++by_) {
        for (unsigned bx_ = 0; bx_ < gx; ++bx_) {
            const unsigned by = flip ? gy - 1 - by_ : by_, bx = flip ? gx - 1 - bx_ : bx_;
            std::fill(shared.begin(), shared.end(), 0xAB);  // garbage, as on a GPU
            emu_smem = shared.data();
            blockIdx.x = bx;
            blockIdx.y = by;
            for (unsigned t = 0; t < threads; ++t) {
                emu_fiber& f = fibers[t];
                f.done = false;
                getcontext(&f.ctx);
                f.ctx.uc_stack.ss_sp = stacks.data() + (size_t)t * STACK;
                f.ctx.uc_stack.ss_size = STACK;
                f.ctx.uc_link = &emu_main;
                makecontext(&f.ctx, emu_entry, 0);
            }
            for (unsigned phase = 0, live = threads; live > 0; ++phase) {
                live = 0;
                for (unsigned i = 0; i < threads; ++i) {
                    const unsigned t = (phase % 2 == 1) != flip ? threads - 1 - i : i;
                    if (fibers[t].done) continue;
                    threadIdx.x = t;
                    emu_running = &fibers[t];
                    swapcontext(&emu_main, &fibers[t].ctx);
                    live += !fibers[t].done;
                }
            }
        }
    }
}
