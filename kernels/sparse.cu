// First layer on sparse input: a CSR matrix times a dense one, the same kernel for both of the
// first layer's sparse-dense products (the rest of the network is dense, unchanged).
//
//   out[r, c] = sum_{k in row r} data[k] * w[indices[k], c]        (rows, K) @ (K, n) -> (rows, n)
//
//   forward:         X (B, n_0) CSR      @ W^1.T (n_0, n_1)  -> z^1      (B, n_1)
//   weight gradient: X.T (n_0, B) CSR    @ delta^1 (B, n_1)  -> dW^1.T   (n_0, n_1)
//
// X.T in CSR is the batch transposed on the host (scipy), so the gradient needs no atomics:
// each output value is one thread's sum over its row's entries, in the CSR order (the order of
// scipy's own products), the same bits whatever the launch shape or block order.
// w[j, c] is read at w[j * w_j + c * w_c] and out[r, c] written at out[r * o_r + c * o_c]
// (strides in elements): the weights may be stored (n_0, n_1) or (n_1, n_0), gpubp's layout,
// and the gradient written in either. One block per row (grid-stride over rows), its threads
// over the n columns; an empty row gives zeros.
#include "common.cuh"

namespace gpubp {

template <typename T>
__global__ void csr_dense(const i64* __restrict__ indptr, const int* __restrict__ indices,
                          const T* __restrict__ data, i64 rows, const T* __restrict__ w, i64 w_j,
                          i64 w_c, int n, T* __restrict__ out, i64 o_r, i64 o_c) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {  // uniform in the block
        const i64 k0 = indptr[r], k1 = indptr[r + 1];
        for (int c = threadIdx.x; c < n; c += blockDim.x) {
            T acc = T(0);
            for (i64 k = k0; k < k1; ++k) {
                acc += data[k] * w[static_cast<i64>(indices[k]) * w_j + c * w_c];
            }
            out[r * o_r + c * o_c] = acc;
        }
    }
}

}  // namespace gpubp
