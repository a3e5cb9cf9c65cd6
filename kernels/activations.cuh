// Activations and their derivatives, shared by every gpubp kernel family.
//
// The ids are the same numbers as gpubp/activations.py (ACTIVATION_IDS); a test keeps the two
// lists in step. Derivatives are written in terms of the stored output a = f(z), which is exact
// for every elementwise activation here, so the backward pass never needs z.
#pragma once

namespace gpubp {

enum Activation : int {
    ACT_IDENTITY = 0,
    ACT_SIGMOID = 1,
    ACT_TANH = 2,
    ACT_RELU = 3,
    ACT_LEAKY_RELU = 4,
    ACT_SOFTMAX = 5,  // row-wise; output layer only, never passed to the elementwise helpers
    ACT_EXP = 6,      // output layer only: the Poisson loss's output
};

template <typename T>
struct LeakySlope {
    static constexpr T value = T(0.01);
};

// f(z) for the elementwise activations.
template <int ACT, typename T>
__device__ __forceinline__ T activate(T z) {
    if constexpr (ACT == ACT_IDENTITY) {
        return z;
    } else if constexpr (ACT == ACT_SIGMOID) {
        // 1 / (1 + exp(-z)): relatively accurate for z << 0, and exactly 0 once exp overflows.
        return T(1) / (T(1) + exp(-z));
    } else if constexpr (ACT == ACT_TANH) {
        return tanh(z);
    } else if constexpr (ACT == ACT_RELU) {
        return z > T(0) ? z : T(0);
    } else if constexpr (ACT == ACT_EXP) {
        return exp(z);
    } else {
        static_assert(ACT == ACT_LEAKY_RELU, "activate<>: not an elementwise activation");
        return z > T(0) ? z : LeakySlope<T>::value * z;
    }
}

// f'(z) written with the output a = f(z).
template <int ACT, typename T>
__device__ __forceinline__ T derivative_from_output(T a) {
    if constexpr (ACT == ACT_IDENTITY) {
        return T(1);
    } else if constexpr (ACT == ACT_SIGMOID) {
        return a * (T(1) - a);
    } else if constexpr (ACT == ACT_TANH) {
        return T(1) - a * a;
    } else if constexpr (ACT == ACT_RELU) {
        return a > T(0) ? T(1) : T(0);
    } else if constexpr (ACT == ACT_EXP) {
        return a;
    } else {
        static_assert(ACT == ACT_LEAKY_RELU, "derivative_from_output<>: not elementwise");
        return a > T(0) ? T(1) : LeakySlope<T>::value;
    }
}

}  // namespace gpubp
