// Backward, hidden layers: the fused Hadamard step in place on the backward GEMM output.
//
//   g = delta_next @ W_next   (cuBLAS, written into g)            (B, n_next) @ (n_next, n)
//   g *= f'(a)                this file; f' from the stored output a = f(z)     (B, n)
//
// A delta that comes out NaN or infinite sets STATUS_BAD (the update of this step is skipped).
#include "common.cuh"

namespace gpubp {

// g, a: count elements each (same layout); g is overwritten with delta.
template <typename T, int ACT>
__global__ void hidden_delta(T* __restrict__ g, const T* __restrict__ a, i64 count,
                             int* __restrict__ status) {
    constexpr int V = Pack<T>::N;
    const i64 stride = grid_threads();
    bool bad = false;
    i64 start = 0;
    if (aligned16(g) && aligned16(a)) {
        const i64 nvec = count / V;
        for (i64 i = global_thread(); i < nvec; i += stride) {
            Pack<T> x = load16(g + i * V);
            const Pack<T> y = load16(a + i * V);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                x.v[k] *= derivative_from_output<ACT>(y.v[k]);
                bad |= !finite(x.v[k]);
            }
            store16(g + i * V, x);
        }
        start = nvec * V;  // the tail of fewer than V elements goes the scalar way
    }
    for (i64 i = start + global_thread(); i < count; i += stride) {
        const T d = g[i] * derivative_from_output<ACT>(a[i]);
        bad |= !finite(d);
        g[i] = d;
    }
    if (bad) flag_bad(status);
}

}  // namespace gpubp
