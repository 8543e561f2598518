// One read of a hook's activations on the GPU for its standard reducers (see cuda_layer.py).
//
// x is (M, N) row-major (M = contexts x rows per context), bfloat16 or float32. A block owns 16 columns
// and `per_block` contexts; its 256 threads are 16 columns x 16 lanes, lanes striding over a context's
// rows, so a warp reads two rows of 16 adjacent columns (coalesced). For every mined row it
//   - counts the value's histogram bin in shared memory (flushed with one global atomic per non-zero bin),
//   - sums (x - shift)^p, p = 1..4, in float64 (shift: the context's first mined value), n_active, min, max,
//   - tracks the context's peak (highest value, first position on ties),
//   - appends (row, column) to the top / bottom candidate lists when its key beats the column's k-th.
// Per-context partials go to (contexts, N) arrays that the caller combines with vectorised torch ops, so
// nothing depends on the order threads run in (candidates are ranked by key afterwards).
//
// Built with nvcc by cuda_layer.py; with -DEMULATE it builds for the CPU (cuda_emulate.h: one std::thread
// per CUDA thread), which is how tests/test_cuda_layer.py checks the logic on a machine without a GPU.

#ifdef EMULATE
#include "cuda_emulate.h"
#else
#include <cuda_runtime.h>
#include <cstdint>
#endif

#define COLS 16
#define LANES 16
#define THREADS (COLS * LANES)
#define UNROLL 4
#define INT32_LOWEST (-2147483647 - 1)

struct Params {
    const void* x;            // (M, N) bfloat16 bits (uint16) or float32 bits (uint32)
    const int64_t* tok;       // (M,) global token index, -1 = not mined
    const int32_t* first;     // (n_ctx,) first mined row of each context (relative), -1 = none
    int64_t M, N, T;          // rows, columns, rows per context (the last context may be shorter)
    int64_t n_ctx, per_block;
    // top / bottom candidates: a row's key must beat the column's k-th (image, tok)
    const int32_t* top_o; const int64_t* top_tok;
    const int32_t* bot_o; const int64_t* bot_tok;
    int64_t* top_cand; int32_t* top_count;
    int64_t* bot_cand; int32_t* bot_count;
    int64_t cap;              // capacity of each candidate list; 0: no candidates (dense ranking elsewhere)
    // histogram: bin of float32 bits, as HistogramBins.index32
    unsigned long long* counts;  // (N, nb) int64, or null
    int32_t shift, base, R, zero_bin, nb;
    // per-context outputs, (n_ctx, N)
    double* mean; double* m2; double* m3; double* m4;
    float* vmin; float* vmax; int32_t* active; int32_t* cnt;
    int32_t* peak_o; int32_t* peak_pos;   // null: no contexts
};

__device__ __forceinline__ uint32_t load_bits(const void* x, int64_t i, int bf16) {
    if (bf16) return ((uint32_t)((const uint16_t*)x)[i]) << 16;
    return ((const uint32_t*)x)[i];
}

__device__ __forceinline__ int32_t ordered(uint32_t b) {
    // float32 bits -> an int32 monotone in the value, -0 == +0 (NaN handled by the caller)
    int32_t mag = (int32_t)(b & 0x7FFFFFFFu);
    return (b >> 31) ? -mag : mag;
}

__device__ __forceinline__ int bin_of(uint32_t b, const Params& p) {
    uint32_t a = b & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return p.nb - 1;
    if (a == 0) return p.zero_bin;
    int32_t t = (int32_t)(a >> p.shift) - p.base;
    t = t < -1 ? -1 : (t > p.R ? p.R : t);
    return (b >> 31) ? p.R - t : p.R + 4 + t;
}

template <int BF16>
__global__ void layer_kernel(Params p) {
#ifdef EMULATE
    unsigned char* smem = emu_smem;
#else
    extern __shared__ __align__(16) unsigned char smem[];
#endif
    double* red = (double*)smem;                      // THREADS doubles
    int32_t* ired = (int32_t*)(red + THREADS);        // THREADS ints
    int32_t* ipos = ired + THREADS;                   // THREADS ints
    int32_t* hist = ipos + THREADS;                   // COLS * nb ints
    const int tid = threadIdx.x, c = tid % COLS, lane = tid / COLS;
    const int64_t n = (int64_t)blockIdx.x * COLS + c;
    const bool col_ok = n < p.N;
    if (p.counts) {
        for (int i = tid; i < COLS * p.nb; i += THREADS) hist[i] = 0;
    }
    __syncthreads();
    const int32_t top_o = (col_ok && p.cap) ? p.top_o[n] : 0, bot_o = (col_ok && p.cap) ? p.bot_o[n] : 0;
    const int64_t top_tok = (col_ok && p.cap) ? p.top_tok[n] : 0, bot_tok = (col_ok && p.cap) ? p.bot_tok[n] : 0;
    const int64_t ctx0 = (int64_t)blockIdx.y * p.per_block;
    for (int64_t ctx = ctx0; ctx < ctx0 + p.per_block && ctx < p.n_ctx; ++ctx) {
        const int64_t row0 = ctx * p.T;
        const int64_t len = (p.M - row0) < p.T ? (p.M - row0) : p.T;
        const int32_t f = p.first[ctx];
        double shift = 0.0;
        if (f >= 0 && col_ok) {
            float v0 = __uint_as_float(load_bits(p.x, (row0 + f) * p.N + n, BF16));
            if (isfinite(v0)) shift = (double)v0;
        }
        double s1 = 0, s2 = 0, s3 = 0, s4 = 0;
        float lo = INFINITY, hi = -INFINITY;
        int32_t act = 0, count = 0, nan_seen = 0, po = INT32_LOWEST, ppos = 2147483647;
        if (f >= 0 && col_ok) {
            // UNROLL rows per step, all loads issued before any is used: several loads in flight per thread
            for (int64_t t0 = f + lane; t0 < len; t0 += UNROLL * LANES) {
                int64_t tks[UNROLL];
                uint32_t bits[UNROLL];
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const int64_t t = t0 + u * LANES;
                    tks[u] = t < len ? p.tok[row0 + t] : -1;
                    bits[u] = t < len ? load_bits(p.x, (row0 + t) * p.N + n, BF16) : 0u;
                }
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const int64_t tk = tks[u], t = t0 + u * LANES, row = row0 + t;
                    if (tk < 0) continue;
                    const uint32_t b = bits[u];
                    const float v = __uint_as_float(b);
                    ++count;
                    if (p.counts) atomicAdd(&hist[c * p.nb + bin_of(b, p)], 1);
                    if ((b & 0x7FFFFFFFu) > 0x7F800000u) { nan_seen = 1; continue; }
                    const double d = (double)v - shift, d2 = d * d;
                    s1 += d; s2 += d2; s3 += d2 * d; s4 += d2 * d2;
                    lo = fminf(lo, v); hi = fmaxf(hi, v);
                    act += v > 0.0f;
                    const int32_t o = ordered(b);
                    if (o > po) { po = o; ppos = (int32_t)t; }  // t rises: the first of equal peaks stays
                    if (p.cap) {
                        if (o > top_o || (o == top_o && tk < top_tok)) {
                            int32_t i = atomicAdd(p.top_count, 1);
                            if (i < p.cap) p.top_cand[i] = row * p.N + n;
                        }
                        if (o < bot_o || (o == bot_o && tk < bot_tok)) {
                            int32_t i = atomicAdd(p.bot_count, 1);
                            if (i < p.cap) p.bot_cand[i] = row * p.N + n;
                        }
                    }
                }
            }
        }
        // lanes -> lane 0 of each column, one statistic at a time through shared memory
        double tot[4];
        double stat[4] = {s1, s2, s3, s4};
        for (int s = 0; s < 4; ++s) {
            red[tid] = stat[s];
            __syncthreads();
            if (lane == 0) {
                double acc = 0;
                for (int l = 0; l < LANES; ++l) acc += red[l * COLS + c];
                tot[s] = acc;
            }
            __syncthreads();
        }
        red[tid] = lo;
        ired[tid] = count;
        ipos[tid] = act;
        __syncthreads();
        float tlo = INFINITY;
        int32_t tcount = 0, tact = 0;
        if (lane == 0) {
            for (int l = 0; l < LANES; ++l) {
                tlo = fminf(tlo, (float)red[l * COLS + c]);
                tcount += ired[l * COLS + c];
                tact += ipos[l * COLS + c];
            }
        }
        __syncthreads();
        red[tid] = hi;
        ired[tid] = nan_seen;
        __syncthreads();
        float thi = -INFINITY;
        int32_t tnan = 0;
        if (lane == 0) {
            for (int l = 0; l < LANES; ++l) {
                thi = fmaxf(thi, (float)red[l * COLS + c]);
                tnan |= ired[l * COLS + c];
            }
        }
        __syncthreads();
        ired[tid] = po;
        ipos[tid] = ppos;
        __syncthreads();
        if (lane == 0 && col_ok) {
            int32_t bo = INT32_LOWEST, bp = 2147483647;
            for (int l = 0; l < LANES; ++l) {
                int32_t o = ired[l * COLS + c], q = ipos[l * COLS + c];
                if (o > bo || (o == bo && q < bp)) { bo = o; bp = q; }
            }
            const int64_t out = ctx * p.N + n;
            if (p.peak_o) { p.peak_o[out] = bo; p.peak_pos[out] = bp; }
            const double cn = (double)tcount;
            double mean = 0, m2 = 0, m3 = 0, m4 = 0;
            if (tcount > 0) {  // central sums from the shifted ones (the shift is one of the values)
                const double a = tot[0] / cn;
                mean = shift + a;
                m2 = tot[1] - tot[0] * a;
                m3 = tot[2] - 3.0 * a * tot[1] + 2.0 * a * a * tot[0];
                m4 = tot[3] - 4.0 * a * tot[2] + 6.0 * a * a * tot[1] - 3.0 * a * a * a * tot[0];
            }
            if (tnan) { mean = m2 = m3 = m4 = NAN; tlo = thi = NAN; }
            p.mean[out] = mean; p.m2[out] = m2; p.m3[out] = m3; p.m4[out] = m4;
            p.vmin[out] = tlo; p.vmax[out] = thi; p.active[out] = tact; p.cnt[out] = tcount;
        }
        __syncthreads();
    }
    if (p.counts) {
        __syncthreads();
        for (int i = tid; i < COLS * p.nb; i += THREADS) {
            const int32_t v = hist[i];
            const int64_t col = (int64_t)blockIdx.x * COLS + i / p.nb;
            if (v != 0 && col < p.N) atomicAdd(&p.counts[col * p.nb + i % p.nb], (unsigned long long)v);
        }
    }
}

extern "C" int64_t layer_smem_bytes(int32_t nb) {
    return (int64_t)THREADS * (8 + 4 + 4) + (int64_t)COLS * nb * 4;
}

extern "C" int layer_launch(Params* p, int bf16, void* stream) {
    const int64_t smem = layer_smem_bytes(p->counts ? p->nb : 0);
    const unsigned gx = (unsigned)((p->N + COLS - 1) / COLS);
    const unsigned gy = (unsigned)((p->n_ctx + p->per_block - 1) / p->per_block);
#ifdef EMULATE
    if (bf16) emu_launch(gx, gy, THREADS, smem, [&] { layer_kernel<1>(*p); });
    else emu_launch(gx, gy, THREADS, smem, [&] { layer_kernel<0>(*p); });
    return 0;
#else
    cudaError_t e;
    if (bf16) {
        e = cudaFuncSetAttribute(layer_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e == cudaSuccess) layer_kernel<1><<<dim3(gx, gy), THREADS, smem, (cudaStream_t)stream>>>(*p);
    } else {
        e = cudaFuncSetAttribute(layer_kernel<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e == cudaSuccess) layer_kernel<0><<<dim3(gx, gy), THREADS, smem, (cudaStream_t)stream>>>(*p);
    }
    if (e != cudaSuccess) return (int)e;
    return (int)cudaGetLastError();
#endif
}
