// Output layer: bias, output activation, loss per row and delta^L in one kernel, written in place
// over the last forward GEMM's output; then a one-block, fixed-order sum of the row losses.
//
// With v = z + b (B, n), a = f(v), Y the targets (dense rows or one-hot rows from int64 labels):
//   softmax + cross-entropy: loss_r = sum_j Y_j (m - v_j) + (sum_j Y_j) log s,
//                            m = max_j v_j, s = sum_j exp(v_j - m);   delta = (a - Y) / B
//   MSE, elementwise f:      loss_r = sum_j (a_j - Y_j)^2;            delta = (a - Y) f'(a) / B
//   MSE, softmax:            g = (a - Y) / B;                          delta = a (g - sum_j g_j a_j)
//   sigmoid + BCE:           loss_r = sum_j (1 - Y_j) max(v_j, 0) - Y_j min(v_j, 0)
//                                     + log1p(exp(-|v_j|));            delta = (a - Y) / B
//   exp + Poisson:           loss_r = sum_j Y_j log Y_j - Y_j v_j - Y_j + exp(v_j)
//                                     (0 log 0 = 0);                   delta = (a - Y) / B
// C = scale * sum_r loss_r, with scale 1/B (log-losses) or 1/(2B) (MSE), by finalize_loss.
// Every row is handled by one warp; row losses go to row_loss[r], so the total does not depend
// on the order in which warps finish. A non-finite delta or loss sets STATUS_BAD.
#include "common.cuh"

namespace gpubp {

template <typename T, int TGT>
__device__ __forceinline__ T target(const T* __restrict__ yr, i64 label, int j) {
    if constexpr (TGT == TARGET_LABELS) {
        return static_cast<i64>(j) == label ? T(1) : T(0);  // out-of-range labels match nothing
    } else {
        return yr[j];
    }
}

template <typename T>
__device__ __forceinline__ T biased(const T* __restrict__ zr, const T* __restrict__ b, int j) {
    return b == nullptr ? zr[j] : zr[j] + b[j];
}

// z: (rows, n), in: last GEMM output, out: delta^L. b: (n,) or null (z already holds z + b).
// y: (rows, n) dense targets (TGT == TARGET_DENSE); labels: (rows,) int64 (TARGET_LABELS).
template <typename T, int TGT>
__global__ void softmax_cross_entropy(T* __restrict__ z, const T* __restrict__ b,
                                      const T* __restrict__ y, const i64* __restrict__ labels,
                                      i64 rows, int n, T inv_batch, T* __restrict__ row_loss,
                                      int* __restrict__ status) {
    if (!whole_warps(status)) return;
    const int lane = threadIdx.x & 31;
    const i64 warps = grid_threads() >> 5;
    bool bad = false;
    for (i64 r = global_thread() >> 5; r < rows; r += warps) {
        T* zr = z + r * n;
        const T* yr = TGT == TARGET_DENSE ? y + r * n : nullptr;
        const i64 label = TGT == TARGET_LABELS ? labels[r] : -1;
        T m = neg_inf<T>();
        for (int j = lane; j < n; j += 32) m = fmax(m, biased(zr, b, j));
        m = warp_max(m);
        T s = T(0), yv = T(0), ysum = T(0);
        for (int j = lane; j < n; j += 32) {
            const T v = biased(zr, b, j);
            const T t = target<T, TGT>(yr, label, j);
            s += exp(v - m);
            yv += t * (m - v);  // m - v >= 0: no cancellation of a large m
            ysum += t;
        }
        s = warp_sum(s);
        yv = warp_sum(yv);
        ysum = warp_sum(ysum);
        const T inv_s = T(1) / s;
        for (int j = lane; j < n; j += 32) {
            const T v = biased(zr, b, j);
            const T d = (exp(v - m) * inv_s - target<T, TGT>(yr, label, j)) * inv_batch;
            bad |= !finite(d);
            zr[j] = d;
        }
        if (lane == 0) row_loss[r] = yv + ysum * log(s);
    }
    if (bad) flag_bad(status);
}

// The losses taken element by element share their kernel: one warp per row, each element's
// delta written in place over z and its loss term summed to the row's loss. Term is a functor,
// T operator()(T v, T t, T inv_batch, T& d): the loss term of v = z + b against target t, and
// the delta d. (Each term's operations are those of the kernel it came from, so the bits are.)
template <typename T, int TGT, class Term>
__device__ __forceinline__ void elementwise_loss(Term term, T* __restrict__ z,
                                                 const T* __restrict__ b, const T* __restrict__ y,
                                                 const i64* __restrict__ labels, i64 rows, int n,
                                                 T inv_batch, T* __restrict__ row_loss,
                                                 int* __restrict__ status) {
    if (!whole_warps(status)) return;
    const int lane = threadIdx.x & 31;
    const i64 warps = grid_threads() >> 5;
    bool bad = false;
    for (i64 r = global_thread() >> 5; r < rows; r += warps) {
        T* zr = z + r * n;
        const T* yr = TGT == TARGET_DENSE ? y + r * n : nullptr;
        const i64 label = TGT == TARGET_LABELS ? labels[r] : -1;
        T l = T(0);
        for (int j = lane; j < n; j += 32) {
            T d;
            l += term(biased(zr, b, j), target<T, TGT>(yr, label, j), inv_batch, d);
            bad |= !finite(d);
            zr[j] = d;
        }
        l = warp_sum(l);
        if (lane == 0) row_loss[r] = l;
    }
    if (bad) flag_bad(status);
}

// MSE with an elementwise output activation ACT: (a - t)^2, delta (a - t) f'(a) / B.
template <typename T, int ACT>
struct MseTerm {
    __device__ __forceinline__ T operator()(T v, T t, T inv_batch, T& d) const {
        const T a = activate<ACT>(v);
        const T res = a - t;
        d = (res * inv_batch) * derivative_from_output<ACT>(a);
        return res * res;
    }
};

// Sigmoid + binary cross-entropy in the stable form (no softplus(v) - y v cancellation):
// (1 - y) max(v, 0) - y min(v, 0) + log1p(exp(-|v|)), delta (sigmoid(v) - t) / B.
template <typename T>
struct BceTerm {
    __device__ __forceinline__ T operator()(T v, T t, T inv_batch, T& d) const {
        d = (activate<ACT_SIGMOID>(v) - t) * inv_batch;
        return (T(1) - t) * fmax(v, T(0)) - t * fmin(v, T(0)) + log1p(exp(-fabs(v)));
    }
};

// Exp + half the Poisson deviance (Y >= 0): Y log Y - Y v - Y + exp(v), delta (exp(v) - t) / B.
template <typename T>
struct PoissonTerm {
    __device__ __forceinline__ T operator()(T v, T t, T inv_batch, T& d) const {
        const T a = activate<ACT_EXP>(v);
        d = (a - t) * inv_batch;
        return (t > T(0) ? t * log(t) : T(0)) - t * v - t + a;
    }
};

// MSE for every output activation; ACT is the output activation (ACT_SOFTMAX: row-wise Jacobian,
// its own kernel body; the elementwise ones MseTerm).
template <typename T, int ACT, int TGT>
__global__ void mse_loss(T* __restrict__ z, const T* __restrict__ b, const T* __restrict__ y,
                         const i64* __restrict__ labels, i64 rows, int n, T inv_batch,
                         T* __restrict__ row_loss, int* __restrict__ status) {
    if constexpr (ACT != ACT_SOFTMAX) {
        elementwise_loss<T, TGT>(MseTerm<T, ACT>{}, z, b, y, labels, rows, n, inv_batch,
                                 row_loss, status);
    } else {
        if (!whole_warps(status)) return;
        const int lane = threadIdx.x & 31;
        const i64 warps = grid_threads() >> 5;
        bool bad = false;
        for (i64 r = global_thread() >> 5; r < rows; r += warps) {
            T* zr = z + r * n;
            const T* yr = TGT == TARGET_DENSE ? y + r * n : nullptr;
            const i64 label = TGT == TARGET_LABELS ? labels[r] : -1;
            T sq = T(0);
            T m = neg_inf<T>();
            for (int j = lane; j < n; j += 32) m = fmax(m, biased(zr, b, j));
            m = warp_max(m);
            T s = T(0);
            for (int j = lane; j < n; j += 32) s += exp(biased(zr, b, j) - m);
            s = warp_sum(s);
            const T inv_s = T(1) / s;
            T ga = T(0);  // sum_j g_j a_j
            for (int j = lane; j < n; j += 32) {
                const T a = exp(biased(zr, b, j) - m) * inv_s;
                const T res = a - target<T, TGT>(yr, label, j);
                sq += res * res;
                ga += (res * inv_batch) * a;
            }
            ga = warp_sum(ga);
            for (int j = lane; j < n; j += 32) {
                const T a = exp(biased(zr, b, j) - m) * inv_s;
                const T g = (a - target<T, TGT>(yr, label, j)) * inv_batch;
                const T d = a * (g - ga);
                bad |= !finite(d);
                zr[j] = d;
            }
            sq = warp_sum(sq);
            if (lane == 0) row_loss[r] = sq;
        }
        if (bad) flag_bad(status);
    }
}

template <typename T, int TGT>
__global__ void bce_loss(T* __restrict__ z, const T* __restrict__ b, const T* __restrict__ y,
                         const i64* __restrict__ labels, i64 rows, int n, T inv_batch,
                         T* __restrict__ row_loss, int* __restrict__ status) {
    elementwise_loss<T, TGT>(BceTerm<T>{}, z, b, y, labels, rows, n, inv_batch, row_loss, status);
}

template <typename T, int TGT>
__global__ void poisson_loss(T* __restrict__ z, const T* __restrict__ b, const T* __restrict__ y,
                             const i64* __restrict__ labels, i64 rows, int n, T inv_batch,
                             T* __restrict__ row_loss, int* __restrict__ status) {
    elementwise_loss<T, TGT>(PoissonTerm<T>{}, z, b, y, labels, rows, n, inv_batch, row_loss,
                             status);
}

// loss[0] = scale * sum_r row_loss[r], summed in double in common.cuh's fixed_sum order by many
// blocks, in two launches: loss_partial gives part p the LOSS_PART_SLOTS slots from
// p * LOSS_PART_SLOTS on (grid-stride over the parts, any block size) and writes their subtree's
// sum to partial[p]; finalize_loss (one block) sums the parts with the tree's remaining levels.
// The bits are those of one block summing everything (neither the grid nor the block size
// changes the order), so the value depends on neither scheduling nor the launch shape.
// partial: loss_parts(rows) doubles, at most SUM_SLOTS / LOSS_PART_SLOTS.
enum : int { LOSS_PART_SLOTS = 32 };

__device__ __forceinline__ int loss_parts(i64 rows) {
    const int span = sum_span(rows);
    return span > LOSS_PART_SLOTS ? span / LOSS_PART_SLOTS : 1;
}

template <typename T>
__global__ void loss_partial(const T* __restrict__ row_loss, i64 rows,
                             double* __restrict__ partial) {
    __shared__ double part[LOSS_PART_SLOTS];
    const int span = sum_span(rows);
    const int width = span < LOSS_PART_SLOTS ? span : LOSS_PART_SLOTS;
    for (int p = blockIdx.x; p < span / width; p += gridDim.x) {  // uniform in the block
        const double s = fixed_sum_slots(
            rows, [&](i64 i) { return static_cast<double>(row_loss[i]); }, part, p * width, width);
        if (threadIdx.x == 0) partial[p] = s;
    }
}

template <typename T>
__global__ void finalize_loss(const double* __restrict__ partial, i64 rows, double scale,
                              T* __restrict__ loss, int* __restrict__ status) {
    __shared__ double part[SUM_SLOTS / LOSS_PART_SLOTS];
    if (blockIdx.x != 0) return;
    const double s = fixed_sum(loss_parts(rows), [&](i64 p) { return partial[p]; }, part);
    if (threadIdx.x == 0) {
        const T value = static_cast<T>(s * scale);
        loss[0] = value;
        if (!finite(value)) flag_bad(status);
    }
}

// The loss ledger of the train steps, appended to by each step (in its graph): the step's loss
// into the next slot of the current block of losses, and weight * loss into the running float64
// total of the losses, one step after another (the host's sum, to the bit: never an FMA).
// ledger: {block (T*), count (slots used), total (double*)}; the host starts a new block, or a
// new total, by uploading the words, never per step.
template <typename T>
__global__ void record_loss(const T* __restrict__ loss, double weight,
                            long long* __restrict__ ledger) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const T v = loss[0];
    reinterpret_cast<T*>(ledger[0])[ledger[1]] = v;
    ledger[1] += 1;
    double* total = reinterpret_cast<double*>(ledger[2]);
    total[0] = __dadd_rn(total[0], __dmul_rn(static_cast<double>(v), weight));
}

}  // namespace gpubp
