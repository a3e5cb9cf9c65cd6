// Bias gradient: the column sums of delta (B, n), in two deterministic passes.
//
//   partial[s, c] = sum_{r in split s} delta[r, c]       (double; splits of rows_per_split rows)
//   db[c]         = sum_s partial[s, c]                   (common.cuh's fixed_sum order)
//
// A column sum that is not finite (NaN in delta, or a float32 overflow of the double sum) sets
// STATUS_BAD, so the step's update is skipped. (The update itself is never fused here: one
// block per column cannot know whether another column's sum overflowed, so a fused update could
// change some biases of a step that must change none.)
//
// Two forms, the same bits: one layer (bias_grad_partial, bias_grad_finish), or every layer of
// a train step in the same two launches (bias_grad_partial_layers, bias_grad_finish_layers)
// from a layer table of BIAS_COLS int64 per layer; layer l's partial sums are partial[item0_l +
// s * n_l + c], and its columns are the tiles [tile0_l, tile0_l + ceil(n_l / 32)) of the
// launch-wide tile numbering. Both forms call the same per-item and per-tile bodies below.
#include "common.cuh"

namespace gpubp {

// --- the layer table: one row of BIAS_COLS int64 per layer (mirrored in catalogue.py) ----------
enum BiasColumn : int {
    BIAS_DELTA = 0,   // const T* delta (rows, n), C-contiguous
    BIAS_DB = 1,      // T* db (n,)
    BIAS_ROWS = 2,    // rows
    BIAS_N = 3,       // n, the columns
    BIAS_PER = 4,     // rows_per_split (catalogue.bias_grad_plan)
    BIAS_SPLITS = 5,  // splits
    BIAS_ITEM0 = 6,   // the layer's first partial item (sum of splits * n of the layers before)
    BIAS_TILE0 = 7,   // the layer's first tile of 32 columns (sum of ceil(n / 32) before)
    BIAS_COLS = 8,
};

// The row of the layer whose range of column `col` (ascending from 0 over the layers, every
// range non-empty) holds index i: a binary search, uniform where i is.
__device__ __forceinline__ const i64* bias_layer(const i64* table, int layers, int col, i64 i) {
    int lo = 0, hi = layers - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (table[static_cast<i64>(mid) * BIAS_COLS + col] <= i) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return table + static_cast<i64>(lo) * BIAS_COLS;
}

// Item i = s * n + c of the partial sums: the sum of column c over split s's rows, in row order.
template <typename T>
__device__ __forceinline__ double split_sum(const T* __restrict__ delta, i64 rows, int n,
                                            i64 rows_per_split, i64 i) {
    const i64 s = i / n;
    const int c = static_cast<int>(i - s * n);
    const i64 r0 = s * rows_per_split;
    const i64 r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
    double acc = 0.0;
    for (i64 r = r0; r < r1; ++r) acc += static_cast<double>(delta[r * n + c]);
    return acc;
}

// One thread per (split, column): consecutive threads read consecutive columns of a row.
template <typename T>
__global__ void bias_grad_partial(const T* __restrict__ delta, i64 rows, int n,
                                  i64 rows_per_split, i64 splits, double* __restrict__ partial) {
    const i64 items = splits * n;
    for (i64 i = global_thread(); i < items; i += grid_threads()) {
        partial[i] = split_sum(delta, rows, n, rows_per_split, i);
    }
}

// Every layer of the table: one thread per (layer, split, column) item, items numbered across
// the layers (items = the sum of splits * n), each written to its layer's place in partial.
template <typename T>
__global__ void bias_grad_partial_layers(const i64* __restrict__ table, int layers, i64 items,
                                         double* __restrict__ partial) {
    for (i64 i = global_thread(); i < items; i += grid_threads()) {
        const i64* row = bias_layer(table, layers, BIAS_ITEM0, i);
        const T* delta = reinterpret_cast<const T*>(row[BIAS_DELTA]);
        partial[i] = split_sum(delta, row[BIAS_ROWS], static_cast<int>(row[BIAS_N]),
                               row[BIAS_PER], i - row[BIAS_ITEM0]);
    }
}

// The column sums of partial, threads over contiguous columns: a block takes tiles of 32
// columns (grid-stride), thread (lane, group) sums column tile * 32 + lane over the group's
// share of fixed_sum's slots (BIAS_GROUPS groups of sum_span(splits) / groups consecutive slots,
// fixed_sum_serial), so consecutive threads read consecutive doubles of a partial row; then one
// thread per column adds the groups' subtrees with the tree's remaining levels. The bits are
// fixed_sum's (one block per column) whatever the launch shape.
enum : int { BIAS_GROUPS = 8 };

// One tile of 32 columns of one layer, by the whole block (called by every thread of it).
template <typename T>
__device__ __forceinline__ void bias_finish_tile(const double* __restrict__ partial, i64 splits,
                                                 int n, T* __restrict__ db, int* status, int tile,
                                                 double (&part)[BIAS_GROUPS][32]) {
    const int span = sum_span(splits);
    const int groups = span < BIAS_GROUPS ? span : BIAS_GROUPS;
    const int width = span / groups;
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

template <typename T>
__global__ void bias_grad_finish(const double* __restrict__ partial, i64 splits, int n,
                                 T* __restrict__ db, int* __restrict__ status) {
    __shared__ double part[BIAS_GROUPS][32];
    const int tiles = (n + 31) / 32;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // uniform in the block
        bias_finish_tile(partial, splits, n, db, status, tile, part);
    }
}

// Every layer of the table: tiles numbered across the layers (tiles = the sum of
// ceil(n / 32)); a block's tile, and so its layer, is uniform in the block.
template <typename T>
__global__ void bias_grad_finish_layers(const i64* __restrict__ table, int layers, i64 tiles,
                                        const double* __restrict__ partial,
                                        int* __restrict__ status) {
    __shared__ double part[BIAS_GROUPS][32];
    for (i64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const i64* row = bias_layer(table, layers, BIAS_TILE0, tile);
        bias_finish_tile(partial + row[BIAS_ITEM0], row[BIAS_SPLITS], static_cast<int>(row[BIAS_N]),
                         reinterpret_cast<T*>(row[BIAS_DB]), status,
                         static_cast<int>(tile - row[BIAS_TILE0]), part);
    }
}

}  // namespace gpubp
