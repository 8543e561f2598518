// A hook's standard reducers on the GPU in one call (see cuda_layer.py): one read of the activations, then
// small kernels that fold the results into the reducers' states in place. No torch op runs in between, so
// one layer costs a handful of launches instead of a hundred (on a GPU the launches, not the arithmetic,
// were most of the time).
//
// layer_kernel: x is (M, N) row-major (M = contexts x rows per context), float32, bfloat16 or float16. A
// block owns 16 columns and `per_block` contexts; its 256 threads are 16 columns x 16 lanes, the lanes
// striding over a context's rows, so a warp reads two rows of 16 adjacent columns (coalesced). For every
// mined row it
//   - counts the value's histogram bin in shared memory (written out per block, summed by hist_reduce),
//   - sums (x - shift)^p, p = 1..4 (shift: the context's first mined value), in float64, or in pairs of float32
//     on GPUs whose float64 is slow (Sums below), and n_active, min, max,
//   - tracks the context's peak (highest value, first position on ties) and writes its key if it beats
//     the column's k-th context key,
//   - appends (key, column) to the top / bottom candidate lists when its key beats the column's k-th.
// moments_combine folds the contexts' (count, mean, central sums) into the running moments (Pebay);
// cand_count, cand_scan and cand_scatter group the top / bottom candidates by column (a counting sort), and
// keys_insert puts each column's own candidates, and its contexts' peaks, into its sorted keys. Keys are
// unique (value, then token), so the states do not depend on the order threads run in.
//
// Built with nvcc by cuda_layer.py; with -DEMULATE it builds for the CPU (cuda_emulate.h: a fiber per
// CUDA thread, switched at __syncthreads), which is how the tests check it on a machine without a GPU.

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
#define EMPTY_KEY (-9223372036854775807LL - 1)
#define MAX_TOK 2147483647LL
#define SHIFT_TOK 2147483648LL

struct Ranked {          // one TopK: its state and what the kernel leaves for it
    int64_t* keys;       // (k, N) best first, EMPTY_KEY = free; null: not ranked this call
    const int64_t* floor;  // (N,) or null
    int64_t k;
    int64_t* cand_key;   // (cap,)
    int32_t* cand_col;   // (cap,)
    unsigned long long* count;  // candidates found (may exceed cap; 64-bit: never wraps)
    int32_t* overflow;   // set to 1 when count > cap
    int32_t* fill;       // (N,) scratch, zeroed: candidates per column, then the scatter's cursors
    int32_t* start;      // (N + 1,) scratch: each column's first candidate in `sorted`
    int64_t* sorted;     // (cap,) scratch: the candidates' keys grouped by column
};

struct Params {
    const void* x;            // (M, N) bfloat16 bits (uint16) or float32 bits (uint32)
    const int64_t* tok;       // (M,) global token index, -1 = not mined
    const int32_t* first;     // (n_ctx,) first mined row of each context (relative), -1 = none
    const double* ctx_count;  // (n_ctx,) mined rows of each context
    int64_t M, N, T;          // rows, columns, rows per context (the last context may be shorter)
    int64_t n_ctx, per_block;
    int64_t cap;              // capacity of each candidate list; 0: top/bottom ranked elsewhere
    Ranked top, bottom, ctx;  // ctx.keys null: no contexts
    // histogram: bin of float32 bits, as HistogramBins.index32
    int64_t* counts;          // (N, nb), or null
    int32_t* hist_part;       // (row blocks, N, nb) scratch
    int32_t shift, base, R, zero_bin, nb;
    // per-context scratch, (n_ctx, N)
    double* c_mean; double* c_m2; double* c_m3; double* c_m4;
    float* c_min; float* c_max; int32_t* c_active; int64_t* c_key;
    // running moments, (N,): updated in place; null mean: no moments
    double* mean; double* m2; double* m3; double* m4; double* vmin; double* vmax; int64_t* n_active;
    double n_before;          // rows the running moments hold
    unsigned char* zero;      // scratch zeroed before the kernels (the candidate counts), `zero_bytes` long
    int64_t zero_bytes;
    int32_t sums;             // SUMS_FLOAT64 or SUMS_FLOAT_PAIRS: how the kernel sums the powers
    // direct logit attribution, fused (the GAIN kernels): the value of row i, column n is not x but
    // (x * gain[gain_row[i], n]) / row_scale[i] in float32, the bits DlaBatch's torch product and quotient give
    const float* gain;        // (U, N) float32: each distinct target's gains w_out . d_t
    const int32_t* gain_row;  // (M,) the row's target among them (any valid row where tok < 0: read, not used)
    const float* row_scale;   // (M,) the final norm's scale of the row's position
};

#define SUMS_FLOAT64 0
#define SUMS_FLOAT_PAIRS 1

// element types of x: the kernel reads every value as the bits of its float32 image
#define X_FLOAT32 0
#define X_BFLOAT16 1
#define X_FLOAT16 2

__device__ __forceinline__ uint32_t half_to_float_bits(uint32_t h) {
    // IEEE binary16 -> binary32, exact (as torch's .float()); integer ops only, so nvcc and the emulation
    // compile the same code. A NaN keeps its payload (the kernel only asks whether it is one).
    const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1Fu) return sign | 0x7F800000u | (m << 13);  // inf, NaN
    if (e != 0) return sign | ((e + 112u) << 23) | (m << 13);  // normal: exponent bias 15 -> 127
    if (m == 0) return sign;  // +-0
    int top = 9;  // subnormal: m * 2^-24, normalised on its highest set bit
    while (!((m >> top) & 1u)) --top;
    return sign | ((uint32_t)(top + 103) << 23) | ((m << (23 - top)) & 0x7FFFFFu);
}

__device__ __forceinline__ uint32_t load_bits(const void* x, int64_t i, int dtype) {
    if (dtype == X_BFLOAT16) return ((uint32_t)((const uint16_t*)x)[i]) << 16;
    if (dtype == X_FLOAT16) return half_to_float_bits(((const uint16_t*)x)[i]);
    return ((const uint32_t*)x)[i];
}

template <int DTYPE, bool GAIN>
__device__ __forceinline__ uint32_t value_bits(const Params& p, int64_t row, int64_t n) {
    const uint32_t b = load_bits(p.x, row * p.N + n, DTYPE);
    if (!GAIN) return b;
    // rounded as torch rounds gain * x, then / scale: the same bits as the unfused path (no fma can form here)
    const float u = __fmul_rn(__uint_as_float(b), p.gain[(int64_t)p.gain_row[row] * p.N + n]);
    return __float_as_uint(__fdiv_rn(u, p.row_scale[row]));
}

__device__ __forceinline__ int32_t ordered(uint32_t b) {
    // float32 bits -> an integer monotone in the value, -0 == +0 (NaN handled by the caller); as topk.encode
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

__device__ __forceinline__ int64_t kth(const Ranked& r, int64_t n, int64_t N) {
    int64_t t = r.keys[(r.k - 1) * N + n];
    if (r.floor) {
        int64_t f = r.floor[n];
        t = f > t ? f : t;
    }
    return t;
}

__device__ __forceinline__ void append(const Ranked& r, int64_t cap, int64_t key, int32_t col) {
    const unsigned long long i = atomicAdd(r.count, 1ULL);
    if (i < (unsigned long long)cap) { r.cand_key[i] = key; r.cand_col[i] = col; }
}

// ---- a lane's power sums (x - shift)^p, p = 1..4 ------------------------------------------------------------
// In float64 where the GPU runs it at half its float32 rate (A100, H100, H200). Elsewhere (T4, L4, A10, RTX) float64
// runs at 1/32 to 1/64 of float32, and the seven float64 operations a value would cost more than the rest of the
// kernel: there each sum is an unevaluated pair of float32 (hi + lo, about 44 bits: Dekker's two-sum, and fma for
// exact products), which agrees with float64 far below the 1e-9 the first-use check asks. A value whose distance
// from the shift is outside [2^-24, 2^28) (or infinite), where a pair's parts would underflow or its fourth power
// overflow, goes to float64 sums beside the pairs: rare, and exact as before.

struct Float64Sums {
    double s1 = 0, s2 = 0, s3 = 0, s4 = 0;
    __device__ __forceinline__ void add(float v, float shift) {
        const double d = (double)v - (double)shift, d2 = d * d;
        s1 += d; s2 += d2; s3 += d2 * d; s4 += d2 * d2;
    }
    __device__ __forceinline__ void totals(double* out) const { out[0] = s1; out[1] = s2; out[2] = s3; out[3] = s4; }
};

struct Pair { float hi, lo; };

__device__ __forceinline__ Pair two_sum(float a, float b) {  // a + b = hi + lo exactly
    const float s = a + b, bb = s - a;
    return {s, (a - (s - bb)) + (b - bb)};
}

__device__ __forceinline__ Pair fast_two_sum(float a, float b) {  // the same where |a| >= |b|
    const float s = a + b;
    return {s, b - (s - a)};
}

__device__ __forceinline__ Pair pair_mul(Pair a, Pair b) {
    const float p = a.hi * b.hi;
    return fast_two_sum(p, fmaf(a.hi, b.hi, -p) + (a.hi * b.lo + a.lo * b.hi));
}

__device__ __forceinline__ Pair pair_add(Pair a, Pair b) {
    const Pair s = two_sum(a.hi, b.hi);
    return fast_two_sum(s.hi, s.lo + (a.lo + b.lo));
}

struct FloatPairSums {
    Pair s1 = {0, 0}, s2 = {0, 0}, s3 = {0, 0}, s4 = {0, 0};
    Float64Sums wide;  // the values out of the pairs' range
    __device__ __forceinline__ void add(float v, float shift) {
        const Pair d = two_sum(v, -shift);
        const float a = fabsf(d.hi);
        if (!(a < 0x1p28f) || (a < 0x1p-24f && a != 0.0f)) {  // infinite, huge or tiny: float64
            wide.add(v, shift);
            return;
        }
        const Pair d2 = pair_mul(d, d);
        s1 = pair_add(s1, d);
        s2 = pair_add(s2, d2);
        s3 = pair_add(s3, pair_mul(d2, d));
        s4 = pair_add(s4, pair_mul(d2, d2));
    }
    __device__ __forceinline__ void totals(double* out) const {
        const Pair s[4] = {s1, s2, s3, s4};
        wide.totals(out);
        for (int i = 0; i < 4; ++i) out[i] += (double)s[i].hi + (double)s[i].lo;
    }
};

template <int DTYPE, typename Sums, bool GAIN>
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
    const bool rank = p.cap > 0 && col_ok;
    const int64_t top_thr = rank ? kth(p.top, n, p.N) : 0, bot_thr = rank ? kth(p.bottom, n, p.N) : 0;
    const int64_t top_hi = top_thr >> 31, bot_hi = bot_thr >> 31;  // floor(key / 2^31): the image part
    const int64_t ctx_thr = (p.ctx.keys && col_ok) ? kth(p.ctx, n, p.N) : 0;
    const int64_t ctx0 = (int64_t)blockIdx.y * p.per_block;
    for (int64_t ctx = ctx0; ctx < ctx0 + p.per_block && ctx < p.n_ctx; ++ctx) {
        const int64_t row0 = ctx * p.T;
        const int64_t len = (p.M - row0) < p.T ? (p.M - row0) : p.T;
        const int32_t f = p.first[ctx];
        float shift = 0.0f;
        if (f >= 0 && col_ok) {
            float v0 = __uint_as_float(value_bits<DTYPE, GAIN>(p, row0 + f, n));
            if (isfinite(v0)) shift = v0;
        }
        Sums sums;
        float lo = INFINITY, hi = -INFINITY;
        int32_t act = 0, nan_seen = 0, ppos = 2147483647, po = INT32_LOWEST;
        if (f >= 0 && col_ok) {
            // UNROLL rows per step, all loads issued before any is used: several loads in flight per thread
            for (int64_t t0 = f + lane; t0 < len; t0 += UNROLL * LANES) {
                int64_t tks[UNROLL];
                uint32_t bits[UNROLL];
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const int64_t t = t0 + u * LANES;
                    tks[u] = t < len ? p.tok[row0 + t] : -1;
                    bits[u] = t < len ? value_bits<DTYPE, GAIN>(p, row0 + t, n) : 0u;
                }
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const int64_t tk = tks[u], t = t0 + u * LANES;
                    if (tk < 0) continue;
                    const uint32_t b = bits[u];
                    const float v = __uint_as_float(b);
                    if (p.counts) atomicAdd(&hist[c * p.nb + bin_of(b, p)], 1);
                    if ((b & 0x7FFFFFFFu) > 0x7F800000u) { nan_seen = 1; continue; }
                    sums.add(v, shift);
                    lo = fminf(lo, v); hi = fmaxf(hi, v);
                    act += v > 0.0f;
                    const int32_t o = ordered(b);
                    if (o > po) { po = o; ppos = (int32_t)t; }  // t rises: the first of equal peaks stays
                    // a key's high bits are the image: compare those first (32-bit), build the key only if close
                    if (rank && (int64_t)o >= top_hi) {
                        const int64_t key = (int64_t)o * SHIFT_TOK + (MAX_TOK - tk);
                        if (key > top_thr) append(p.top, p.cap, key, (int32_t)n);
                    }
                    if (rank && -(int64_t)o >= bot_hi) {
                        const int64_t key = -(int64_t)o * SHIFT_TOK + (MAX_TOK - tk);
                        if (key > bot_thr) append(p.bottom, p.cap, key, (int32_t)n);
                    }
                }
            }
        }
        // lanes -> lane 0 of each column, one statistic at a time through shared memory
        double tot[4], stat[4];
        sums.totals(stat);
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
        ired[tid] = act;
        ipos[tid] = nan_seen;
        __syncthreads();
        float tlo = INFINITY;
        int32_t tact = 0, tnan = 0;
        if (lane == 0) {
            for (int l = 0; l < LANES; ++l) {
                tlo = fminf(tlo, (float)red[l * COLS + c]);
                tact += ired[l * COLS + c];
                tnan |= ipos[l * COLS + c];
            }
        }
        __syncthreads();
        red[tid] = hi;
        __syncthreads();
        float thi = -INFINITY;
        if (lane == 0) {
            for (int l = 0; l < LANES; ++l) thi = fmaxf(thi, (float)red[l * COLS + c]);
        }
        __syncthreads();
        // the peak: highest image, then lowest position
        ired[tid] = po;
        ipos[tid] = ppos;
        __syncthreads();
        if (lane == 0 && col_ok) {
            int32_t bo = INT32_LOWEST;
            int32_t bp = 2147483647;
            for (int l = 0; l < LANES; ++l) {
                const int32_t o = ired[l * COLS + c];
                const int32_t q = ipos[l * COLS + c];
                if (o > bo || (o == bo && q < bp)) { bo = o; bp = q; }
            }
            const int64_t out = ctx * p.N + n;
            if (p.ctx.keys) {
                int64_t key = EMPTY_KEY;
                if (bo != INT32_LOWEST) {
                    key = (int64_t)bo * SHIFT_TOK + (MAX_TOK - p.tok[row0 + bp]);
                    if (key <= ctx_thr) key = EMPTY_KEY;  // cannot enter: saves the insert a look
                }
                p.c_key[out] = key;
            }
            const double cn = p.ctx_count[ctx];
            double mean = 0, m2 = 0, m3 = 0, m4 = 0;
            if (cn > 0) {  // central sums from the shifted ones (the shift is one of the values)
                const double a = tot[0] / cn;
                mean = (double)shift + a;
                m2 = tot[1] - tot[0] * a;
                m3 = tot[2] - 3.0 * a * tot[1] + 2.0 * a * a * tot[0];
                m4 = tot[3] - 4.0 * a * tot[2] + 6.0 * a * a * tot[1] - 3.0 * a * a * a * tot[0];
            }
            if (tnan) { mean = m2 = m3 = m4 = NAN; tlo = thi = NAN; }
            p.c_mean[out] = mean; p.c_m2[out] = m2; p.c_m3[out] = m3; p.c_m4[out] = m4;
            p.c_min[out] = tlo; p.c_max[out] = thi; p.c_active[out] = tact;
        }
        __syncthreads();
    }
    if (p.counts) {
        __syncthreads();
        int32_t* part = p.hist_part + ((int64_t)blockIdx.y * p.N + (int64_t)blockIdx.x * COLS) * p.nb;
        const int64_t valid = (p.N - (int64_t)blockIdx.x * COLS) < COLS ? (p.N - (int64_t)blockIdx.x * COLS) : COLS;
        for (int64_t i = tid; i < valid * p.nb; i += THREADS) part[i] = hist[i];
    }
}

__global__ void hist_reduce(Params p, int64_t row_blocks) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x, size = p.N * p.nb;
    if (i >= size) return;
    int64_t acc = 0;
    for (int64_t r = 0; r < row_blocks; ++r) acc += p.hist_part[r * size + i];
    p.counts[i] += acc;
}

__device__ __forceinline__ void pebay(double& na, double& mean, double& m2, double& m3, double& m4,
                                      double nb, double mb, double b2, double b3, double b4) {
    // as moments._combine: the pairwise update of centred sums
    const double n = na + nb, delta = mb - mean, d_n = delta / n, d_n2 = d_n * d_n, term = delta * d_n * na * nb;
    const double nm4 = m4 + b4 + term * d_n2 * (na * na - na * nb + nb * nb) + 6 * d_n2 * (na * na * b2 + nb * nb * m2)
                       + 4 * d_n * (na * b3 - nb * m3);
    const double nm3 = m3 + b3 + term * d_n * (na - nb) + 3 * d_n * (na * b2 - nb * m2);
    m2 = m2 + b2 + term;
    m3 = nm3;
    m4 = nm4;
    mean = mean + d_n * nb;
    na = n;
}

#define PREFETCH 4
#define COLUMN_THREADS 32  // a block, where a thread owns a column: 1,536 columns then use 48 SMs, not 6


__global__ void moments_combine(Params p) {
    const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= p.N) return;
    double na = p.n_before, mean = p.mean[n], m2 = p.m2[n], m3 = p.m3[n], m4 = p.m4[n];
    double lo = p.vmin[n], hi = p.vmax[n];
    int64_t act = p.n_active[n];
    for (int64_t c0 = 0; c0 < p.n_ctx; c0 += PREFETCH) {
        // PREFETCH contexts' loads in flight at once; the Pebay chain then runs on registers
        double cn[PREFETCH], cm[PREFETCH], c2[PREFETCH], c3[PREFETCH], c4[PREFETCH], a[PREFETCH], b[PREFETCH];
        int32_t ca[PREFETCH];
#pragma unroll
        for (int u = 0; u < PREFETCH; ++u) {
            const int64_t c = c0 + u, i = c * p.N + n;
            const bool ok = c < p.n_ctx;
            cn[u] = ok ? p.ctx_count[c] : 0.0;
            cm[u] = ok ? p.c_mean[i] : 0.0; c2[u] = ok ? p.c_m2[i] : 0.0;
            c3[u] = ok ? p.c_m3[i] : 0.0; c4[u] = ok ? p.c_m4[i] : 0.0;
            a[u] = ok ? p.c_min[i] : 0.0; b[u] = ok ? p.c_max[i] : 0.0; ca[u] = ok ? p.c_active[i] : 0;
        }
#pragma unroll
        for (int u = 0; u < PREFETCH; ++u) {
            if (cn[u] <= 0) continue;
            if (na == 0) {
                na = cn[u]; mean = cm[u]; m2 = c2[u]; m3 = c3[u]; m4 = c4[u];
            } else {
                pebay(na, mean, m2, m3, m4, cn[u], cm[u], c2[u], c3[u], c4[u]);
            }
            lo = (isnan(a[u]) || isnan(lo)) ? NAN : (a[u] < lo ? a[u] : lo);  // NaN propagates, as torch.minimum
            hi = (isnan(b[u]) || isnan(hi)) ? NAN : (b[u] > hi ? b[u] : hi);
            act += ca[u];
        }
    }
    p.mean[n] = mean; p.m2[n] = m2; p.m3[n] = m3; p.m4[n] = m4;
    p.vmin[n] = lo; p.vmax[n] = hi; p.n_active[n] = act;
}

// ---- the candidates into the keys ----------------------------------------------------------------------
// A batch's candidates (m of them, in the order threads found them) are grouped by column with a counting
// sort: m + N work. Each column's thread then reads only its own candidates and inserts them into its k keys,
// held in shared memory while it does (one coalesced load and store of the keys instead of a dependent global
// load per shifted key). The scan this replaces had every column's thread read the whole list: m x N work,
// which grows with the square of the model's width (m itself grows with N).

#define GROUP_BLOCKS 1024
#define SCAN_THREADS 256
#define INSERT_THREADS COLUMN_THREADS
#define INSERT_SMEM (48 * 1024)

__device__ __forceinline__ int64_t listed(const Ranked& r, int64_t cap) {
    const unsigned long long count = *r.count;
    return count < (unsigned long long)cap ? (int64_t)count : cap;
}

__device__ __forceinline__ Ranked pick(const Ranked& top, const Ranked& bottom, bool second) {
    // field by field: a reference chosen at run time between two kernel parameters copies both to the stack
    Ranked r;
    r.keys = second ? bottom.keys : top.keys; r.floor = second ? bottom.floor : top.floor;
    r.k = second ? bottom.k : top.k;
    r.cand_key = second ? bottom.cand_key : top.cand_key; r.cand_col = second ? bottom.cand_col : top.cand_col;
    r.count = second ? bottom.count : top.count; r.overflow = second ? bottom.overflow : top.overflow;
    r.fill = second ? bottom.fill : top.fill; r.start = second ? bottom.start : top.start;
    r.sorted = second ? bottom.sorted : top.sorted;
    return r;
}

__global__ void cand_count(Ranked top, Ranked bottom, int64_t cap) {  // grid y: 0 top, 1 bottom
    const Ranked r = pick(top, bottom, blockIdx.y);
    const int64_t m = listed(r, cap), step = (int64_t)gridDim.x * blockDim.x;
    if (blockIdx.x == 0 && threadIdx.x == 0 && *r.count > (unsigned long long)cap) *r.overflow = 1;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < m; i += step) {
        atomicAdd(&r.fill[r.cand_col[i]], 1);
    }
}

__global__ void cand_scan(Ranked top, Ranked bottom, int64_t N) {  // a block a list: start = the counts' prefix sums
    __shared__ int32_t part[SCAN_THREADS];
    const Ranked r = pick(top, bottom, blockIdx.x);
    const int tid = threadIdx.x;
    const int64_t per = (N + SCAN_THREADS - 1) / SCAN_THREADS, lo = tid * per, hi = (lo + per) < N ? (lo + per) : N;
    int32_t own = 0;
    for (int64_t i = lo; i < hi; ++i) own += r.fill[i];
    part[tid] = own;
    __syncthreads();
    for (int off = 1; off < SCAN_THREADS; off <<= 1) {  // inclusive scan of the threads' sums
        const int32_t v = tid >= off ? part[tid - off] : 0;
        __syncthreads();
        part[tid] += v;
        __syncthreads();
    }
    int32_t acc = part[tid] - own;
    for (int64_t i = lo; i < hi; ++i) {
        const int32_t c = r.fill[i];
        r.start[i] = acc;
        r.fill[i] = acc;  // the scatter's cursor
        acc += c;
    }
    if (tid == SCAN_THREADS - 1) r.start[N] = acc;
}

__global__ void cand_scatter(Ranked top, Ranked bottom, int64_t cap) {  // grid y: 0 top, 1 bottom
    const Ranked r = pick(top, bottom, blockIdx.y);
    const int64_t m = listed(r, cap), step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < m; i += step) {
        r.sorted[atomicAdd(&r.fill[r.cand_col[i]], 1)] = r.cand_key[i];
    }
}

__device__ __forceinline__ void insert(int64_t* keys, int64_t stride, int64_t k, int64_t key) {
    // into one column's keys (keys[j * stride], best first); keys are unique, so the order of inserts does
    // not matter
    if (key <= keys[(k - 1) * stride]) return;
    int64_t j = k - 1;
    while (j > 0 && keys[(j - 1) * stride] < key) {
        keys[j * stride] = keys[(j - 1) * stride];
        --j;
    }
    keys[j * stride] = key;
}

struct ColumnKeys {  // one column's k keys, in shared memory once the column has a candidate (global if too many)
    int64_t* global; int64_t* keys; int64_t stride, k, N; bool staged, loaded;

    __device__ void add(int64_t key) {
        if (!loaded) {
            if (staged) for (int64_t j = 0; j < k; ++j) keys[j * stride] = global[j * N];
            loaded = true;
        }
        insert(keys, stride, k, key);
    }
    __device__ void store() {
        if (staged && loaded) for (int64_t j = 0; j < k; ++j) global[j * N] = keys[j * stride];
    }
};

#define CTX_STAGE 8

__global__ void keys_insert(Params p, int64_t smem) {  // grid y: 0 top, 1 bottom, 2 context peaks
#ifdef EMULATE
    int64_t* shared_keys = (int64_t*)emu_smem;
#else
    extern __shared__ __align__(16) unsigned char insert_smem[];
    int64_t* shared_keys = (int64_t*)insert_smem;
#endif
    const Ranked& r = blockIdx.y == 0 ? p.top : blockIdx.y == 1 ? p.bottom : p.ctx;
    const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (!r.keys || (blockIdx.y < 2 && !p.cap) || n >= p.N) return;  // no barrier below: threads may leave
    const bool staged = r.k * (int64_t)blockDim.x * 8 <= smem;
    ColumnKeys col{r.keys + n, staged ? shared_keys + threadIdx.x : r.keys + n,
                   staged ? (int64_t)blockDim.x : p.N, r.k, p.N, staged, false};
    if (blockIdx.y < 2) {
        for (int64_t i = r.start[n]; i < r.start[n + 1]; ++i) col.add(r.sorted[i]);
    } else {
        for (int64_t c0 = 0; c0 < p.n_ctx; c0 += CTX_STAGE) {  // CTX_STAGE contexts' keys loaded at once
            int64_t keys[CTX_STAGE];
#pragma unroll
            for (int u = 0; u < CTX_STAGE; ++u) keys[u] = c0 + u < p.n_ctx ? p.c_key[(c0 + u) * p.N + n] : EMPTY_KEY;
#pragma unroll
            for (int u = 0; u < CTX_STAGE; ++u) {
                if (keys[u] != EMPTY_KEY) col.add(keys[u]);
            }
        }
    }
    col.store();
}

extern "C" int64_t layer_smem_bytes(int32_t nb) {
    return (int64_t)THREADS * (8 + 4 + 4) + (int64_t)COLS * nb * 4;
}

// What the host asks of the device: an attribute, or `fallback` where it cannot be asked. The emulation answers as
// an H100 would.
#ifdef EMULATE
#define DEVICE_ATTRIBUTE(attr, device, fallback, h100) ((void)(device), (int64_t)(h100))
#else
#define DEVICE_ATTRIBUTE(attr, device, fallback, h100) device_attribute(attr, device, fallback)
static int64_t device_attribute(cudaDeviceAttr attr, int32_t device, int64_t fallback) {
    int v = 0;
    return cudaDeviceGetAttribute(&v, attr, device) == cudaSuccess && v > 0 ? v : fallback;
}
#endif

extern "C" int64_t layer_smem_limit(int32_t device) {
    // the most shared memory a block may opt in to: 227 KB on an H100 or H200, 163 KB on an A100, 99 KB on an
    // RTX 30xx/40xx, A10 or L4, 64 KB on a T4; 48 KB, which every GPU gives, where the device cannot be asked
    return DEVICE_ATTRIBUTE(cudaDevAttrMaxSharedMemoryPerBlockOptin, device, 48 * 1024, 232448);
}

extern "C" int32_t layer_fp64_ratio(int32_t device) {
    // how many times slower float64 runs than float32: 2 on an A100, H100 or H200, 32 on a T4, 64 on an L4, A10 or
    // RTX; 2 where the device cannot be asked (then float64, exact everywhere)
    return (int32_t)DEVICE_ATTRIBUTE(cudaDevAttrSingleToDoublePrecisionPerfRatio, device, 2, 2);
}

extern "C" int64_t layer_row_blocks(int64_t n_ctx, int64_t per_block) {
    return (n_ctx + per_block - 1) / per_block;
}

#ifdef EMULATE
#define LAUNCH(kernel, grid_x, grid_y, threads, smem, ...) \
    emu_launch(grid_x, grid_y, threads, smem, [&] { kernel(__VA_ARGS__); })
#define CHECK() 0
#else
#define LAUNCH(kernel, grid_x, grid_y, threads, smem, ...) \
    kernel<<<dim3(grid_x, grid_y), threads, smem, (cudaStream_t)stream>>>(__VA_ARGS__)
#define CHECK() (int)cudaGetLastError()
#endif

template <int DTYPE, typename Sums, bool GAIN>
int launch_layer(const Params& p, unsigned gx, unsigned gy, int64_t smem, void* stream) {
    void (*kernel)(Params) = layer_kernel<DTYPE, Sums, GAIN>;
#ifndef EMULATE
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) return (int)e;
#endif
    LAUNCH(kernel, gx, gy, THREADS, smem, p);
    return 0;
}

template <typename Sums, bool GAIN>
int launch_layer(const Params& p, int dtype, unsigned gx, unsigned gy, int64_t smem, void* stream) {
    if (dtype == X_BFLOAT16) return launch_layer<X_BFLOAT16, Sums, GAIN>(p, gx, gy, smem, stream);
    if (dtype == X_FLOAT16) return launch_layer<X_FLOAT16, Sums, GAIN>(p, gx, gy, smem, stream);
    return launch_layer<X_FLOAT32, Sums, GAIN>(p, gx, gy, smem, stream);
}

template <typename Sums>
int launch_layer(const Params& p, int dtype, unsigned gx, unsigned gy, int64_t smem, void* stream) {
    return p.gain ? launch_layer<Sums, true>(p, dtype, gx, gy, smem, stream)
                  : launch_layer<Sums, false>(p, dtype, gx, gy, smem, stream);
}

extern "C" int layer_update(Params* pp, int dtype, void* stream) {  // dtype: X_FLOAT32, X_BFLOAT16 or X_FLOAT16
    Params& p = *pp;
    const int64_t smem = layer_smem_bytes(p.counts ? p.nb : 0);
    const unsigned gx = (unsigned)((p.N + COLS - 1) / COLS);
    const int64_t row_blocks = layer_row_blocks(p.n_ctx, p.per_block);
    const unsigned per_col = (unsigned)((p.N + COLUMN_THREADS - 1) / COLUMN_THREADS);
    int64_t max_k = p.ctx.keys ? p.ctx.k : 0;  // keys_insert stages this many keys a column in shared memory
    if (p.cap && p.top.k > max_k) max_k = p.top.k;
    if (p.cap && p.bottom.k > max_k) max_k = p.bottom.k;
    const int64_t insert_smem = max_k * INSERT_THREADS * 8 <= INSERT_SMEM ? max_k * INSERT_THREADS * 8 : 0;
    const unsigned group_blocks = (unsigned)((p.cap + 255) / 256 < GROUP_BLOCKS ? (p.cap + 255) / 256 : GROUP_BLOCKS);
#ifdef EMULATE
    if (p.zero_bytes) memset(p.zero, 0, (size_t)p.zero_bytes);
#else
    if (p.zero_bytes) cudaMemsetAsync(p.zero, 0, (size_t)p.zero_bytes, (cudaStream_t)stream);
#endif
    const unsigned gy = (unsigned)row_blocks;
    const int e = p.sums == SUMS_FLOAT_PAIRS ? launch_layer<FloatPairSums>(p, dtype, gx, gy, smem, stream)
                                             : launch_layer<Float64Sums>(p, dtype, gx, gy, smem, stream);
    if (e) return e;
    if (p.counts) LAUNCH(hist_reduce, (unsigned)((p.N * p.nb + 255) / 256), 1, 256, 0, p, row_blocks);
    if (p.mean) LAUNCH(moments_combine, per_col, 1, COLUMN_THREADS, 0, p);
    if (p.cap) {
        LAUNCH(cand_count, group_blocks, 2, 256, 0, p.top, p.bottom, p.cap);
        LAUNCH(cand_scan, 2, 1, SCAN_THREADS, 0, p.top, p.bottom, p.N);
        LAUNCH(cand_scatter, group_blocks, 2, 256, 0, p.top, p.bottom, p.cap);
    }
    if (p.cap || p.ctx.keys) {
        LAUNCH(keys_insert, per_col, 3, INSERT_THREADS, insert_smem, p, insert_smem);
    }
    return CHECK();
}
