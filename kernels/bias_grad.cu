// Bias gradient: the column sums of delta (B, n), in two deterministic passes, the second one
// optionally fused with the plain-SGD bias update.
//
//   partial[s, c] = sum_{r in split s} delta[r, c]       (double; splits of rows_per_split rows)
//   db[c]         = sum_s partial[s, c]                   (fixed order, one block per column)
//   MODE_WRITE:  db is stored                            (gradients(); any optimizer)
//   MODE_SGD:    b[c] -= lr * db[c] as well, unless STATUS_BAD is set (the folded plain-SGD step)
// A column sum that is not finite (NaN in delta, or a float32 overflow of the rounded double sum)
// sets STATUS_BAD; in MODE_SGD its own column is then left unchanged as well.
#include "common.cuh"

namespace gpubp {

enum BiasGradMode : int { MODE_WRITE = 0, MODE_SGD = 1 };

// One thread per (split, column): consecutive threads read consecutive columns of a row.
template <typename T>
__global__ void bias_grad_partial(const T* __restrict__ delta, i64 rows, int n,
                                  i64 rows_per_split, i64 splits, double* __restrict__ partial) {
    const i64 items = splits * n;
    for (i64 i = global_thread(); i < items; i += grid_threads()) {
        const i64 s = i / n;
        const int c = static_cast<int>(i - s * n);
        const i64 r0 = s * rows_per_split;
        const i64 r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
        double acc = 0.0;
        for (i64 r = r0; r < r1; ++r) acc += static_cast<double>(delta[r * n + c]);
        partial[i] = acc;
    }
}

// One block per column (grid-stride over columns); a fixed-order tree over the splits.
template <typename T, int MODE>
__global__ void bias_grad_finish(const double* __restrict__ partial, i64 splits, int n,
                                 T* __restrict__ db, T* __restrict__ b, const T* __restrict__ hp,
                                 int* __restrict__ status) {
    __shared__ double part[1024];
    for (int c = blockIdx.x; c < n; c += gridDim.x) {  // uniform in the block
        double s = 0.0;
        for (i64 k = threadIdx.x; k < splits; k += blockDim.x) s += partial[k * n + c];
        s = block_sum(s, part);
        if (threadIdx.x == 0) {
            const T g = static_cast<T>(s);  // a float32 sum can overflow here
            db[c] = g;
            if (!finite(g)) flag_bad(status);
            if constexpr (MODE == MODE_SGD) {
                if (status[STATUS_BAD] == 0) b[c] = b[c] - hp[HP_LR] * g;
            }
        }
    }
}

}  // namespace gpubp
