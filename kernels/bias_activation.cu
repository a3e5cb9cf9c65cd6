// Forward epilogue: bias and activation applied in place on the forward GEMM output.
//
//   z = a_prev @ W.T          (cuBLAS, written into z)          (B, n)
//   z[r, c] = f(z[r, c] + b[c])                                   this file
//
// An activation that comes out NaN or infinite sets STATUS_BAD, so the train step's update is
// skipped: it would reach the weight gradient delta.T @ a as inf or inf * 0. So does a NaN
// pre-activation: ReLU turns it into 0 (NaN > 0 is false, as in the reference's where(z > 0)),
// and the NaN input behind it would then reach W only through delta.T @ x, which the folded
// SGD GEMM writes straight into W. (A pre-activation of +-inf that the activation maps to a
// finite value, sigmoid(inf) = 1, is not an error, as it is not one for the reference either.)
#include "common.cuh"

namespace gpubp {

// z: (rows, n) row-major, in place; b: (n,); status: the status word.
template <typename T, int ACT>
__global__ void bias_activation(T* __restrict__ z, const T* __restrict__ b, i64 rows, int n,
                                int* __restrict__ status) {
    constexpr int V = Pack<T>::N;
    const i64 total = rows * n;
    const i64 stride = grid_threads();
    bool bad = false;
    if (n % V == 0 && aligned16(z) && aligned16(b)) {
        // a vector of V elements never crosses a row, and its first column is a multiple of V
        const i64 nvec = total / V;
        for (i64 i = global_thread(); i < nvec; i += stride) {
            const i64 e = i * V;
            Pack<T> x = load16(z + e);
            const Pack<T> bias = load16(b + column_of(e, n));
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const T v = x.v[k] + bias.v[k];
                x.v[k] = activate<ACT>(v);
                bad |= !finite(x.v[k]) || v != v;
            }
            store16(z + e, x);
        }
    } else {
        for (i64 i = global_thread(); i < total; i += stride) {
            const T v = z[i] + b[column_of(i, n)];
            const T a = activate<ACT>(v);
            bad |= !finite(a) || v != v;
            z[i] = a;
        }
    }
    if (bad) flag_bad(status);
}

// Row-wise softmax with bias, in place (inference through a softmax output): one warp per row.
//   a[r, :] = exp(v - max v) / sum exp(v - max v),  v = z[r, :] + b
template <typename T>
__global__ void bias_softmax(T* __restrict__ z, const T* __restrict__ b, i64 rows, int n,
                             int* __restrict__ status) {
    if (!whole_warps(status)) return;
    const int lane = threadIdx.x & 31;
    const i64 warps = grid_threads() >> 5;
    bool bad = false;
    for (i64 r = global_thread() >> 5; r < rows; r += warps) {  // the same r in a whole warp
        T* zr = z + r * n;
        T m = neg_inf<T>();
        for (int j = lane; j < n; j += 32) m = fmax(m, zr[j] + b[j]);
        m = warp_max(m);
        T s = T(0);
        for (int j = lane; j < n; j += 32) s += exp(zr[j] + b[j] - m);
        s = warp_sum(s);
        const T inv_s = T(1) / s;
        for (int j = lane; j < n; j += 32) {
            const T a = exp(zr[j] + b[j] - m) * inv_s;
            bad |= !finite(a);
            zr[j] = a;
        }
    }
    if (bad) flag_bad(status);
}

}  // namespace gpubp
