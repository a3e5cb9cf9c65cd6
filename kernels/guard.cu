// The non-finite guard of the train step, without a host synchronisation per step.
//
// Kernels that produce a pre-activation, delta, loss or gradient set the sticky STATUS_BAD slot
// when a value is NaN or infinite; the update kernels then skip themselves, and finish_step counts
// the skipped step. The host reads the status word only at its own synchronisation points and
// raises NonFiniteLossError there, with the parameters of the last good step.
#include "common.cuh"

namespace gpubp {

// STATUS_BAD if any gradient (TAB_GRAD of every table row) holds NaN or infinity.
template <typename T>
__global__ void check_finite_table(const i64* __restrict__ table, int n_tensors,
                                   int* __restrict__ status) {
    bool bad = false;
    for (int t = 0; t < n_tensors; ++t) {
        const i64* row = table + t * TABLE_COLS;
        const T* g = reinterpret_cast<const T*>(row[TAB_GRAD]);
        const i64 size = row[TAB_SIZE];
        for (i64 i = global_thread(); i < size; i += grid_threads()) bad |= !finite(g[i]);
    }
    if (bad) flag_bad(status);
}

// When STATUS_BAD is set, zero the buffers of the table (TAB_PARAM): the deltas that the folded
// plain-SGD GEMM W = -lr delta.T @ a + W reads, so that a skipped step adds exactly 0 to W.
template <typename T>
__global__ void zero_if_bad_table(const i64* __restrict__ table, int n_tensors,
                                  const int* __restrict__ status) {
    if (status[STATUS_BAD] == 0) return;
    for (int t = 0; t < n_tensors; ++t) {
        const i64* row = table + t * TABLE_COLS;
        T* d = reinterpret_cast<T*>(row[TAB_PARAM]);
        const i64 size = row[TAB_SIZE];
        for (i64 i = global_thread(); i < size; i += grid_threads()) d[i] = T(0);
    }
}

// The last node of a train step: count it as skipped when STATUS_BAD is set.
__global__ void finish_step(int* __restrict__ status) {
    if (blockIdx.x == 0 && threadIdx.x == 0 && status[STATUS_BAD] != 0) {
        status[STATUS_SKIPPED] += 1;
    }
}

}  // namespace gpubp
