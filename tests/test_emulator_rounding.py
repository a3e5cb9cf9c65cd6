"""The emulated GPU rounds like the GPU: float32 subnormals flushed to zero in a float kernel
(CuPy's ``-ftz=true``), ``a*b+c`` contracted to one fused multiply-add (NVRTC's ``--fmad=true``),
and neither leaking out of the launch into NumPy."""

from __future__ import annotations

import numpy as np
import pytest

from cudaemu import kernels as emu

from .conftest import EMULATED_GPU, skip_unless_available

pytestmark = pytest.mark.skipif(not EMULATED_GPU, reason="the emulated GPU's own rounding")

#: float32's smallest normal number is 2**-126 (1.2e-38); these are subnormal.
F32_SUBNORMAL = np.float32(2.0**-130)
F64_SUBNORMAL = 2.0**-1030

MULADD = """
namespace t {
template <class T>
__global__ void muladd(const T* a, const T* b, const T* c, T* out) {
    const int i = threadIdx.x;
    out[i] = a[i] * b[i] + c[i];
}
}  // namespace t
"""


@pytest.fixture
def cp():
    skip_unless_available("cupy")
    from gpubp.backends.cuda.cupy_module import import_cupy

    return import_cupy()


def _muladd(cp, ctype, a, b, c):
    """``a * b + c`` elementwise by a CUDA kernel of C type ``ctype`` (float or double)."""
    name = f"t::muladd<{ctype}>"
    dtype = {"float": np.float32, "double": np.float64}[ctype]
    fn = cp.RawModule(code=MULADD, name_expressions=[name]).get_function(name)
    args = [cp.asarray(np.asarray(v, dtype)) for v in (a, b, c)]
    out = cp.zeros(len(a), dtype)
    fn((1,), (len(a),), (*args, out))
    return out.get()


def test_a_float32_subnormal_is_flushed_in_a_gpubp_kernel_and_a_float64_one_is_not(cp):
    from gpubp.backends.cuda import CupyBackend, launch

    be = CupyBackend()
    status = be.scratch_status()
    for dtype, tiny in (("float32", F32_SUBNORMAL), ("float64", F64_SUBNORMAL)):
        z = cp.asarray(np.full((3, 5), tiny, dtype))
        launch.bias_activation(be.kernel, z, cp.zeros(5, dtype), "relu", status)
        expected = 0.0 if dtype == "float32" else tiny  # relu(tiny + 0): flushed as on a GPU
        np.testing.assert_array_equal(z.get(), np.full((3, 5), expected, dtype))
    # the launch put the host's floating-point mode back: NumPy keeps its subnormals
    assert F32_SUBNORMAL * np.float32(1.0) > 0


def test_products_and_sums_are_fused_as_nvrtc_fuses_them(cp):
    # (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24: the last bit is lost when the product is rounded to
    # float32 on its own, kept when the multiply-add is fused (one rounding, of the exact 2^-24)
    a = np.float32(1 + 2.0**-12)
    c = np.float32(-(1 + 2.0**-11))
    fused = _muladd(cp, "float", [a], [a], [c])[0]
    if "-mfma" not in emu.FP_FLAGS and not emu.platform.machine().startswith("aarch64"):
        pytest.skip("this CPU has no FMA instructions: products and sums are rounded apart")
    assert fused == np.float32(2.0**-24)
    assert np.float32(a * a) + c == 0  # what NumPy (no contraction) gives


def test_a_float32_multiply_add_flushes_subnormal_inputs_and_results(cp):
    tiny = F32_SUBNORMAL
    out = _muladd(cp, "float", [tiny, 2.0**-70, 1.0], [1.0, 2.0**-70, 1.0], [0.0, 0.0, tiny])
    np.testing.assert_array_equal(out, np.array([0.0, 0.0, 1.0], np.float32))
    out64 = _muladd(cp, "double", [F64_SUBNORMAL], [1.0], [0.0])
    assert out64[0] == F64_SUBNORMAL
