// Bias gradient: the column sums of delta (B, n), in two deterministic passes.
//
//   partial[s, c] = sum_{r in split s} delta[r, c]       (double; splits of rows_per_split rows)
//   db[c]         = sum_s partial[s, c]                   (fixed order, one block per column)
//
// A column sum that is not finite (NaN in delta, or a float32 overflow of the double sum) sets
// STATUS_BAD, so the step's update is skipped. (The update itself is never fused here: one
// block per column cannot know whether another column's sum overflowed, so a fused update could
// change some biases of a step that must change none.)
#include "common.cuh"

namespace gpubp {

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

// One block per column (grid-stride over columns); a fixed-order sum over the splits.
template <typename T>
__global__ void bias_grad_finish(const double* __restrict__ partial, i64 splits, int n,
                                 T* __restrict__ db, int* __restrict__ status) {
    __shared__ double part[SUM_SLOTS];
    for (int c = blockIdx.x; c < n; c += gridDim.x) {  // uniform in the block
        const double s = fixed_sum(splits, [&](i64 k) { return partial[k * n + c]; }, part);
        if (threadIdx.x == 0) {
            const T g = static_cast<T>(s);  // a float32 sum can overflow here
            db[c] = g;
            if (!finite(g)) flag_bad(status);
        }
    }
}

}  // namespace gpubp
