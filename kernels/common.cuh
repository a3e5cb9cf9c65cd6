// Shared helpers of every gpubp kernel family: index types, 16-byte vector access, warp
// reductions, the non-finite status word and the optimizer's hyper-parameter block.
//
// Every kernel uses grid-stride loops, so the launch shape tunes speed and never decides
// correctness; 16-byte vector access is taken only when the pointers and row lengths allow it,
// with a scalar path otherwise. The numbers below are mirrored in gpubp/backends/cuda/catalogue.py
// (a test keeps the two in step).
#pragma once

#include "activations.cuh"

namespace gpubp {

typedef long long i64;

// --- the status word: int32 slots in device memory, read by the host only at sync points ------
enum StatusSlot : int {
    STATUS_BAD = 0,      // sticky: a loss, pre-activation, delta or gradient was NaN or infinite
    STATUS_SKIPPED = 1,  // train steps whose update was skipped since the host last looked
    STATUS_LAUNCH = 2,   // a kernel was launched with a block size it cannot use (internal error)
    STATUS_SLOTS = 4,
};

// --- the hyper-parameter block: T values in device memory, written by the host before a step ---
// (device memory, not kernel arguments, so a captured CUDA graph sees a changed learning rate;
// Adam's train step writes its block itself from a float64 one and a step counter,
// adam_step_scalars in optimizers.cu, and a step with a schedule its rate, schedule_lr)
enum HyperSlot : int {
    HP_LR = 0,
    HP_MOMENTUM = 1,
    HP_WEIGHT_DECAY = 2,
    HP_BETA1 = 3,
    HP_BETA2 = 4,
    HP_EPS = 5,
    HP_ALPHA = 6,         // Adam: lr sqrt(1 - beta2^t) / (1 - beta1^t) (optim.adam_scalars)
    HP_EPS_HAT = 7,       // Adam: eps sqrt(1 - beta2^t)
    HP_DECAY = 8,         // 1 - lr * weight_decay (AdamW's shrink; 1 for Adam)
    HP_LR_MOMENTUM = 9,   // lr * momentum (Nesterov)
    HP_NEG_LR = 10,       // -lr: the alpha of the folded SGD weight-update GEMM
    HP_ONE = 11,          // 1: GEMM alpha / beta
    HP_ZERO = 12,         // 0: GEMM beta
    HP_ONE_MINUS_BETA1 = 13,
    HP_ONE_MINUS_BETA2 = 14,
    HP_SLOTS = 16,
};

// --- a learning-rate schedule the train step computes on the device (schedule_lr in
// optimizers.cu): SCHED_SLOTS doubles written by the host when they change (gpubp.schedules) ---
enum ScheduleSlot : int {
    SCHED_KIND = 0,         // 0: the host sets the rate; else gpubp.schedules.FORMULAS' code
    SCHED_LR = 1,           // the peak rate
    SCHED_STEPS = 2,        // T, at least 1
    SCHED_SCALED_DECAY = 3, // 1: HP_DECAY is 1 - lr * weight_decay (SGD, AdamW); 0: left (Adam)
    SCHED_SLOTS = 4,
};
enum ScheduleKind : int {
    SCHED_KIND_HOST = 0,
    SCHED_KIND_CONSTANT = 1,
    SCHED_KIND_COSINE = 2,
};

// --- target kinds of the output-layer kernels --------------------------------------------------
enum TargetKind : int {
    TARGET_DENSE = 0,   // y is a (B, n) array of T
    TARGET_LABELS = 1,  // labels is a (B,) array of int64 class indices (one-hot rows)
    TARGET_NONE = 2,    // no targets (metrics only: argmax without accuracy)
};

// --- optimizer table: one row of TABLE_COLS int64 per tensor ------------------------------------
enum TableColumn : int {
    TAB_PARAM = 0,   // T* parameter (or the buffer zeroed/checked by the guard kernels)
    TAB_GRAD = 1,    // const T* gradient
    TAB_STATE1 = 2,  // T* momentum buffer / Adam m (0 when unused)
    TAB_STATE2 = 3,  // T* Adam v (0 when unused)
    TAB_SIZE = 4,    // number of elements
    TAB_CHUNK0 = 5,  // index of the tensor's first chunk in the launch-wide chunk numbering
    TABLE_COLS = 6,
};

// Many threads may raise a flag in one launch, all storing 1: an atomic (relaxed, as every CUDA
// atomic is) makes that defined behaviour rather than a benign data race, at no cost when no flag
// is raised, which is every healthy step.
__device__ __forceinline__ void raise_flag(int* status, int slot) { atomicExch(status + slot, 1); }

__device__ __forceinline__ void flag_bad(int* status) { raise_flag(status, STATUS_BAD); }

template <typename T>
__device__ __forceinline__ bool finite(T v) {
    return isfinite(v);
}

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
    return __int_as_float(0xff800000);
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
}

// --- 16-byte vectors ---------------------------------------------------------------------------
template <typename T>
struct Pack {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

__device__ __forceinline__ Pack<float> load16(const float* p) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    return Pack<float>{{q.x, q.y, q.z, q.w}};
}
__device__ __forceinline__ Pack<double> load16(const double* p) {
    const double2 q = *reinterpret_cast<const double2*>(p);
    return Pack<double>{{q.x, q.y}};
}
__device__ __forceinline__ void store16(float* p, const Pack<float>& x) {
    *reinterpret_cast<float4*>(p) = make_float4(x.v[0], x.v[1], x.v[2], x.v[3]);
}
__device__ __forceinline__ void store16(double* p, const Pack<double>& x) {
    *reinterpret_cast<double2*>(p) = make_double2(x.v[0], x.v[1]);
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ULL) == 0ULL;
}

// --- grid-stride indices -------------------------------------------------------------------------
__device__ __forceinline__ i64 global_thread() {
    return static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ i64 grid_threads() {
    return static_cast<i64>(gridDim.x) * blockDim.x;
}

// Column of the flat row-major index e in rows of n; 32-bit division where the index allows.
__device__ __forceinline__ int column_of(i64 e, int n) {
    if (e < 0x7fffffffLL) {
        return static_cast<int>(static_cast<unsigned>(e) % static_cast<unsigned>(n));
    }
    return static_cast<int>(e % n);
}

// --- warps ---------------------------------------------------------------------------------------
// The row kernels give one warp to a row; they need whole warps. A block size that is not a
// multiple of 32 is refused loudly (STATUS_LAUNCH) rather than giving wrong numbers.
__device__ __forceinline__ bool whole_warps(int* status) {
    if ((blockDim.x & 31u) != 0u) {
        if (threadIdx.x == 0) raise_flag(status, STATUS_LAUNCH);
        return false;
    }
    return true;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Fixed-order sum of value(i) for i < count, in double, by one block of any size up to 1024,
// the same bit for bit whatever the block size: slot k of SUM_SLOTS accumulates the items
// k, k + SUM_SLOTS, k + 2 SUM_SLOTS, ... in that order, then a pairwise tree sums the slots in
// use (the smallest power of two >= min(count, SUM_SLOTS), sum_span; the others would add only
// zeros). Neither step depends on blockDim (threads only share out the slots), so a launch shape
// tuned for speed never changes a loss or a bias gradient. Called by every thread of the block;
// the result is valid in every thread. shared: SUM_SLOTS doubles of __shared__ memory.
enum : int { SUM_SLOTS = 1024 };

__device__ __forceinline__ int sum_span(i64 count) {
    int span = 1;
    while (span < SUM_SLOTS && span < count) span <<= 1;
    return span;
}

// The slots [first, first + width) of fixed_sum(count, ...) and their pairwise tree: the value
// the whole tree holds at slot `first` after its first log2(width) levels (width a power of two
// dividing sum_span(count), first a multiple of width). The whole fixed_sum is
// fixed_sum_slots(count, value, shared, 0, sum_span(count)); a multi-block sum gives each block
// a part of `width` slots, then sums the parts' values with fixed_sum again (the tree's
// remaining levels), the same bits as one block.
template <typename F>
__device__ __forceinline__ double fixed_sum_slots(i64 count, F value, double* shared, int first,
                                                  int width) {
    for (int k = threadIdx.x; k < width; k += blockDim.x) {
        double s = 0.0;
        for (i64 i = first + k; i < count; i += SUM_SLOTS) s += value(i);
        shared[k] = s;
    }
    __syncthreads();
    for (int w = 1; w < width; w <<= 1) {
        for (int k = 2 * w * static_cast<int>(threadIdx.x); k < width;
             k += 2 * w * static_cast<int>(blockDim.x)) {
            shared[k] += shared[k + w];
        }
        __syncthreads();
    }
    const double total = shared[0];
    __syncthreads();  // every thread has read it before the buffer can be reused
    return total;
}

template <typename F>
__device__ __forceinline__ double fixed_sum(i64 count, F value, double* shared) {
    return fixed_sum_slots(count, value, shared, 0, sum_span(count));
}

// The same tree, summed by one thread: the slots [first, first + width) of fixed_sum(count,
// value) (as fixed_sum_slots) with a stack of subtree sums (a slot joins its left neighbour
// once both halves of a subtree are complete), so a thread per column needs no shared memory
// and reads value(i) for consecutive columns in consecutive threads.
template <typename F>
__device__ __forceinline__ double fixed_sum_serial(i64 count, F value, int first, int width) {
    double stack[12];  // subtree sums of sizes 2^level, at most log2(SUM_SLOTS) + 1 of them
    int level[12];
    int top = 0;
    for (int k = 0; k < width; ++k) {
        double s = 0.0;
        for (i64 i = first + k; i < count; i += SUM_SLOTS) s += value(i);
        int l = 0;
        while (top > 0 && level[top - 1] == l) {  // a complete left sibling: left += right
            s = stack[top - 1] + s;
            --top;
            ++l;
        }
        stack[top] = s;
        level[top] = l;
        ++top;
    }
    return stack[0];
}

}  // namespace gpubp
