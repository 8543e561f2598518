// Just enough of CUDA to run cuda_layer.cu's kernel on the CPU: one std::thread per CUDA thread, a
// std::barrier for __syncthreads, one block at a time. For tests on machines without a GPU; slow.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local emu_dim3 threadIdx, blockIdx;
inline emu_dim3 blockDim, gridDim;
inline std::barrier<>* emu_barrier = nullptr;
inline unsigned char* emu_smem = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static  // one instance for all threads; blocks run one at a time
#define __syncthreads() emu_barrier->arrive_and_wait()

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __fmul_rn(float a, float b) { return a * b; }  // x86-64: SSE, rounded to nearest
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int32_t atomicAdd(int32_t* p, int32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
using std::isfinite;
using std::isnan;

inline void emu_launch(unsigned gx, unsigned gy, unsigned threads, int64_t smem, const std::function<void()>& body) {
    std::vector<unsigned char> shared((size_t)smem + 16);
    blockDim.x = threads;
    gridDim.x = gx;
    gridDim.y = gy;
    for (unsigned by = 0; by < gy; ++by) {
        for (unsigned bx = 0; bx < gx; ++bx) {
            std::fill(shared.begin(), shared.end(), 0xAB);  // garbage, as on a GPU
            emu_smem = shared.data();
            std::barrier<> bar((std::ptrdiff_t)threads);
            emu_barrier = &bar;
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t) {
                pool.emplace_back([&, t] {
                    threadIdx.x = t;
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    body();
                });
            }
            for (auto& th : pool) th.join();
        }
    }
}
