// Bias gradient: the column sums of delta (B, n), in two deterministic passes.
//
//   partial[s, c] = sum_{r in split s} delta[r, c]       (double; splits of rows_per_split rows)
//   db[c]         = sum_s partial[s, c]                   (common.cuh's fixed_sum order)
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

// The column sums of partial, threads over contiguous columns: a block takes tiles of 32
// columns (grid-stride), thread (lane, group) sums column tile * 32 + lane over the group's
// share of fixed_sum's slots (BIAS_GROUPS groups of sum_span(splits) / groups consecutive slots,
// fixed_sum_serial), so consecutive threads read consecutive doubles of a partial row; then one
// thread per column adds the groups' subtrees with the tree's remaining levels. The bits are
// fixed_sum's (one block per column) whatever the launch shape.
enum : int { BIAS_GROUPS = 8 };

template <typename T>
__global__ void bias_grad_finish(const double* __restrict__ partial, i64 splits, int n,
                                 T* __restrict__ db, int* __restrict__ status) {
    __shared__ double part[BIAS_GROUPS][32];
    const int span = sum_span(splits);
    const int groups = span < BIAS_GROUPS ? span : BIAS_GROUPS;
    const int width = span / groups;
    const int tiles = (n + 31) / 32;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform in the block
        for (int t = threadIdx.x; t < 32 * groups; t += blockDim.x) {
            const int lane = t & 31, g = t >> 5;
            const int c = tile * 32 + lane;
            if (c < n) {
                part[g][lane] = fixed_sum_serial(
                    splits, [&](i64 k) { return partial[k * n + c]; }, g * width, width);
            }
        }
        __syncthreads();
        for (int lane = threadIdx.x; lane < 32; lane += blockDim.x) {
            const int c = tile * 32 + lane;
            if (c >= n) continue;
            double v[BIAS_GROUPS];
            for (int g = 0; g < groups; ++g) v[g] = part[g][lane];
            for (int w = 1; w < groups; w <<= 1) {
                for (int k = 0; k < groups; k += 2 * w) v[k] += v[k + w];
            }
            const T g = static_cast<T>(v[0]);  // a float32 sum can overflow here
            db[c] = g;
            if (!finite(g)) flag_bad(status);
        }
        __syncthreads();  // the groups' sums are read before the next tile writes them
    }
}

}  // namespace gpubp
