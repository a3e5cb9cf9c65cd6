// Evaluation: argmax per row and the count of correct predictions (integer atomics, so the
// count is exact and independent of scheduling).
#include "common.cuh"

namespace gpubp {

// Whether (v, i) beats (w, k) for argmax with NumPy's rule: the first maximum wins, and a NaN
// counts as the maximum (the first NaN wins).
template <typename T>
__device__ __forceinline__ bool beats(T v, int i, T w, int k) {
    const bool vn = isnan(v), wn = isnan(w);
    if (vn != wn) return vn;
    if (!vn && v != w) return v > w;
    return i < k;
}

// a: (rows, n) outputs; truth from y (dense: its argmax) or labels (TGT); pred: (rows,) int64 or
// null; correct: one counter, incremented by the number of rows whose argmax is the truth.
template <typename T, int TGT>
__global__ void argmax_accuracy(const T* __restrict__ a, const T* __restrict__ y,
                                const i64* __restrict__ labels, i64 rows, int n,
                                i64* __restrict__ pred, unsigned long long* __restrict__ correct,
                                int* __restrict__ status) {
    if (!whole_warps(status)) return;
    const int lane = threadIdx.x & 31;
    const i64 warps = grid_threads() >> 5;
    unsigned long long hits = 0;
    for (i64 r = global_thread() >> 5; r < rows; r += warps) {
        const T* ar = a + r * n;
        T best = neg_inf<T>();
        int arg = n;  // "none yet": loses every tie on index
        T ybest = neg_inf<T>();
        int yarg = n;
        for (int j = lane; j < n; j += 32) {
            if (arg == n || beats(ar[j], j, best, arg)) { best = ar[j]; arg = j; }
            if constexpr (TGT == TARGET_DENSE) {
                const T t = y[r * n + j];
                if (yarg == n || beats(t, j, ybest, yarg)) { ybest = t; yarg = j; }
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const T ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
            if (oa != n && (arg == n || beats(ob, oa, best, arg))) { best = ob; arg = oa; }
            if constexpr (TGT == TARGET_DENSE) {
                const T yb = __shfl_xor_sync(0xffffffffu, ybest, o);
                const int ya = __shfl_xor_sync(0xffffffffu, yarg, o);
                if (ya != n && (yarg == n || beats(yb, ya, ybest, yarg))) { ybest = yb; yarg = ya; }
            }
        }
        if (lane == 0) {
            if (pred != nullptr) pred[r] = arg;
            if constexpr (TGT == TARGET_DENSE) {
                hits += arg == yarg ? 1ULL : 0ULL;
            } else if constexpr (TGT == TARGET_LABELS) {
                hits += static_cast<i64>(arg) == labels[r] ? 1ULL : 0ULL;
            }
        }
    }
    if (TGT != TARGET_NONE && hits != 0ULL) atomicAdd(correct, hits);
}

// Per-output threshold accuracy (sigmoid + BCE): counts elements with (a > 0.5) == (y > 0.5).
template <typename T>
__global__ void threshold_accuracy(const T* __restrict__ a, const T* __restrict__ y, i64 count,
                                   unsigned long long* __restrict__ correct) {
    unsigned long long hits = 0;
    for (i64 i = global_thread(); i < count; i += grid_threads()) {
        hits += ((a[i] > T(0.5)) == (y[i] > T(0.5))) ? 1ULL : 0ULL;
    }
    if (hits != 0ULL) atomicAdd(correct, hits);
}

}  // namespace gpubp
