// Optimizer updates for every parameter of the network in one launch, from a table of pointers
// and sizes (one row of TABLE_COLS int64 per tensor, see common.cuh). The maths is that of
// gpubp/reference.py (torch.optim's SGD, Adam and AdamW), weight decay included on biases:
//
//   SGD:   g = grad + wd p;  momentum: buf = mu buf + g;  p -= lr (g + mu buf)  (Nesterov)
//                                                         p -= lr buf          (plain momentum)
//          without momentum: p -= lr g
//   Adam:  g = grad + wd p (L2)  or  p *= 1 - lr wd (AdamW, decoupled)
//          m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//          p -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps), computed as
//          p -= alpha m / (sqrt(v) + eps_hat), alpha = lr sqrt(1 - b2^t) / (1 - b1^t),
//          eps_hat = eps sqrt(1 - b2^t): the scalars of gpubp.optim.adam_scalars, as NumPy's
//          and Numba's Adam take them
//
// Hyper-parameters are read from the device block hp (HP_* slots), so a captured CUDA graph
// follows a changing learning rate. Every kernel returns at once when STATUS_BAD is set: the
// step that produced a NaN keeps the parameters and state of the last good step.
//
// Each rule also has a check kernel (*_check_table), launched before its update kernel: it
// computes the same new values without writing them and raises STATUS_BAD if any new parameter
// or state value is NaN or infinite (a non-finite gradient makes its new parameter so). The
// update kernel then skips itself, so a step whose update would overflow changes nothing: the
// check must see every block's values before any block writes, which one kernel cannot do.
#include "common.cuh"

namespace gpubp {

// The tensor holding launch-wide chunk ch: the last row whose TAB_CHUNK0 <= ch.
__device__ __forceinline__ int tensor_of_chunk(const i64* __restrict__ table, int n_tensors,
                                               i64 ch) {
    int lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (table[mid * TABLE_COLS + TAB_CHUNK0] <= ch) lo = mid; else hi = mid - 1;
    }
    return lo;
}

template <typename T, int MOMENTUM, int NESTEROV>
struct SgdRule {
    T lr, mu, wd, lr_mu;
    __device__ explicit SgdRule(const T* hp)
        : lr(hp[HP_LR]), mu(hp[HP_MOMENTUM]), wd(hp[HP_WEIGHT_DECAY]),
          lr_mu(hp[HP_LR_MOMENTUM]) {}
    __device__ __forceinline__ void operator()(T& p, T grad, T& buf, T&) const {
        const T g = wd != T(0) ? grad + p * wd : grad;
        if constexpr (MOMENTUM) {
            buf = buf * mu + g;
            if constexpr (NESTEROV) {
                p = p - g * lr;
                p = p - buf * lr_mu;
            } else {
                p = p - buf * lr;
            }
        } else {
            p = p - g * lr;
        }
    }
};

template <typename T, int DECOUPLED>
struct AdamRule {
    T wd, decay, b1, b2, omb1, omb2, alpha, eps_hat;
    __device__ explicit AdamRule(const T* hp)
        : wd(hp[HP_WEIGHT_DECAY]), decay(hp[HP_DECAY]), b1(hp[HP_BETA1]), b2(hp[HP_BETA2]),
          omb1(hp[HP_ONE_MINUS_BETA1]), omb2(hp[HP_ONE_MINUS_BETA2]), alpha(hp[HP_ALPHA]),
          eps_hat(hp[HP_EPS_HAT]) {}
    __device__ __forceinline__ void operator()(T& p, T grad, T& m, T& v) const {
        T g = grad;
        if constexpr (DECOUPLED) {
            if (wd != T(0)) p = p * decay;
        } else {
            if (wd != T(0)) g = grad + p * wd;
        }
        m = m * b1 + g * omb1;
        v = v * b2 + (g * g) * omb2;
        const T denom = sqrt(v) + eps_hat;
        p = p - (m / denom) * alpha;
    }
};

// Apply Rule to every element of every tensor of the table; chunk elements per launch-wide chunk.
template <typename T, typename Rule>
__device__ __forceinline__ void apply_table(const Rule& rule, const i64* __restrict__ table,
                                            int n_tensors, i64 total_chunks, i64 chunk) {
    constexpr int V = Pack<T>::N;
    for (i64 ch = blockIdx.x; ch < total_chunks; ch += gridDim.x) {  // uniform in the block
        const i64* row = table + tensor_of_chunk(table, n_tensors, ch) * TABLE_COLS;
        T* p = reinterpret_cast<T*>(row[TAB_PARAM]);
        const T* g = reinterpret_cast<const T*>(row[TAB_GRAD]);
        T* s1 = reinterpret_cast<T*>(row[TAB_STATE1]);
        T* s2 = reinterpret_cast<T*>(row[TAB_STATE2]);
        const i64 size = row[TAB_SIZE];
        const i64 begin = (ch - row[TAB_CHUNK0]) * chunk;
        const i64 end = begin + chunk < size ? begin + chunk : size;
        T dummy1 = T(0), dummy2 = T(0);
        i64 start = begin;
        const bool vec = chunk % V == 0 && aligned16(p) && aligned16(g) &&
                         (s1 == nullptr || aligned16(s1)) && (s2 == nullptr || aligned16(s2));
        if (vec) {
            const i64 nvec = (end - begin) / V;
            for (i64 k = threadIdx.x; k < nvec; k += blockDim.x) {
                const i64 e = begin + k * V;
                Pack<T> pp = load16(p + e);
                const Pack<T> gg = load16(g + e);
                Pack<T> a1 = s1 != nullptr ? load16(s1 + e) : Pack<T>{};
                Pack<T> a2 = s2 != nullptr ? load16(s2 + e) : Pack<T>{};
#pragma unroll
                for (int q = 0; q < V; ++q) rule(pp.v[q], gg.v[q], a1.v[q], a2.v[q]);
                store16(p + e, pp);
                if (s1 != nullptr) store16(s1 + e, a1);
                if (s2 != nullptr) store16(s2 + e, a2);
            }
            start = begin + nvec * V;
        }
        for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            T& r1 = s1 != nullptr ? s1[i] : dummy1;
            T& r2 = s2 != nullptr ? s2[i] : dummy2;
            rule(p[i], g[i], r1, r2);
        }
    }
}

// Whether Rule gives a NaN or infinite new value (parameter or state) for any element of the table;
// nothing is written.
template <typename T, typename Rule>
__device__ __forceinline__ bool table_has_nonfinite(const Rule& rule, const i64* __restrict__ table,
                                                    int n_tensors, i64 total_chunks, i64 chunk) {
    bool bad = false;
    for (i64 ch = blockIdx.x; ch < total_chunks; ch += gridDim.x) {
        const i64* row = table + tensor_of_chunk(table, n_tensors, ch) * TABLE_COLS;
        const T* p = reinterpret_cast<const T*>(row[TAB_PARAM]);
        const T* g = reinterpret_cast<const T*>(row[TAB_GRAD]);
        const T* s1 = reinterpret_cast<const T*>(row[TAB_STATE1]);
        const T* s2 = reinterpret_cast<const T*>(row[TAB_STATE2]);
        const i64 size = row[TAB_SIZE];
        const i64 begin = (ch - row[TAB_CHUNK0]) * chunk;
        const i64 end = begin + chunk < size ? begin + chunk : size;
        for (i64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
            T q = p[i];
            T r1 = s1 != nullptr ? s1[i] : T(0);
            T r2 = s2 != nullptr ? s2[i] : T(0);
            rule(q, g[i], r1, r2);
            bad |= !finite(q) || !finite(r1) || !finite(r2);
        }
    }
    return bad;
}

template <typename T, int MOMENTUM, int NESTEROV>
__global__ void sgd_check_table(const i64* __restrict__ table, int n_tensors, i64 total_chunks,
                                i64 chunk, const T* __restrict__ hp, int* __restrict__ status) {
    // no early return on a raised flag: other blocks of this launch may be raising it, and a
    // plain read of it here would race with their atomic write (the check only raises it again)
    const SgdRule<T, MOMENTUM, NESTEROV> rule(hp);
    if (table_has_nonfinite<T>(rule, table, n_tensors, total_chunks, chunk)) flag_bad(status);
}

template <typename T, int DECOUPLED>
__global__ void adam_check_table(const i64* __restrict__ table, int n_tensors, i64 total_chunks,
                                 i64 chunk, const T* __restrict__ hp, int* __restrict__ status) {
    const AdamRule<T, DECOUPLED> rule(hp);
    if (table_has_nonfinite<T>(rule, table, n_tensors, total_chunks, chunk)) flag_bad(status);
}

template <typename T, int MOMENTUM, int NESTEROV>
__global__ void sgd_update_table(const i64* __restrict__ table, int n_tensors, i64 total_chunks,
                                 i64 chunk, const T* __restrict__ hp,
                                 const int* __restrict__ status) {
    if (status[STATUS_BAD] != 0) return;
    apply_table<T>(SgdRule<T, MOMENTUM, NESTEROV>(hp), table, n_tensors, total_chunks, chunk);
}

template <typename T, int DECOUPLED>
__global__ void adam_update_table(const i64* __restrict__ table, int n_tensors, i64 total_chunks,
                                  i64 chunk, const T* __restrict__ hp,
                                  const int* __restrict__ status) {
    if (status[STATUS_BAD] != 0) return;
    apply_table<T>(AdamRule<T, DECOUPLED>(hp), table, n_tensors, total_chunks, chunk);
}

// Adam's hyper-parameter block from the step counter in device memory, so that the captured
// step uploads nothing per step: every slot of the float64 block hp64 (what
// gpubp.backends.cuda.catalogue.hyperparameters computes in float64) rounded once to T, then
// HP_ALPHA and HP_EPS_HAT of step t = steps[0] + 1 from hp64's lr, betas and eps exactly as
// gpubp.optim.adam_scalars computes them, operation for operation in float64 (no product is
// added to anything, so there is nothing to contract into an FMA). One thread.
template <typename T>
__global__ void adam_step_scalars(T* __restrict__ hp, const double* __restrict__ hp64,
                                  const i64* __restrict__ steps) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    for (int i = 0; i < HP_SLOTS; ++i) hp[i] = static_cast<T>(hp64[i]);
    const double t = static_cast<double>(steps[0] + 1);
    const double root_bc2 = sqrt(1.0 - pow(hp64[HP_BETA2], t));
    hp[HP_EPS_HAT] = static_cast<T>(hp64[HP_EPS] * root_bc2);
    hp[HP_ALPHA] = static_cast<T>(hp64[HP_LR] * root_bc2 / (1.0 - pow(hp64[HP_BETA1], t)));
}

// The learning rate of global step count[0] (0 first) from the schedule block sched, as
// gpubp.schedules.Schedule.at computes it in float64, operation for operation (cosine:
// lr * c * c with c = cos(pi t / 2T); no product is added to anything there), written into the
// float64 block hp64 with the slots derived from it as gpubp.backends.cuda.catalogue.
// hyperparameters derives them (1 - lr * weight_decay through __dmul_rn / __dadd_rn, so that
// it is not contracted into an FMA); then count[0] advances (every step, skipped or not: it
// counts global steps) and hp64 is rounded once into hp. With SCHED_KIND_HOST the host's rate
// in hp64 is kept and the counter is not read. One thread; first in the train step.
template <typename T>
__global__ void schedule_lr(T* __restrict__ hp, double* __restrict__ hp64,
                            const double* __restrict__ sched, i64* __restrict__ count) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const int kind = static_cast<int>(sched[SCHED_KIND]);
    if (kind != SCHED_KIND_HOST) {
        double lr = sched[SCHED_LR];
        if (kind == SCHED_KIND_COSINE) {
            const double pi = 3.141592653589793;  // math.pi
            const double c = cos(pi * static_cast<double>(count[0]) / (2.0 * sched[SCHED_STEPS]));
            lr = lr * c * c;
        }
        hp64[HP_LR] = lr;
        hp64[HP_NEG_LR] = -lr;
        hp64[HP_LR_MOMENTUM] = __dmul_rn(lr, hp64[HP_MOMENTUM]);
        if (sched[SCHED_SCALED_DECAY] != 0.0)
            hp64[HP_DECAY] = __dadd_rn(1.0, -__dmul_rn(lr, hp64[HP_WEIGHT_DECAY]));
        count[0] += 1;
    }
    for (int i = 0; i < HP_SLOTS; ++i) hp[i] = static_cast<T>(hp64[i]);
}

// After the update: the step counter advances unless STATUS_BAD is set (a skipped step is not
// counted, as the host takes back its optimizer step count). One thread.
__global__ void count_step(i64* __restrict__ steps, const int* __restrict__ status) {
    if (blockIdx.x == 0 && threadIdx.x == 0 && status[STATUS_BAD] == 0) steps[0] += 1;
}

}  // namespace gpubp
