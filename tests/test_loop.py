"""The epoch loop's batch gathering: reused buffers, the same rows and the same training."""

from __future__ import annotations

import numpy as np
import pytest

import gpubp
from gpubp.gather import BatchGather
from gpubp.loop import EpochLoop
from gpubp.optim import Adam

from .conftest import skip_unless_available


def _data(rng, n, n_in, n_out, dtype=np.float32):
    X = (rng.normal(0, 3, (n, n_in)) * 10.0 ** rng.integers(-2, 3, (n, 1))).astype(dtype)
    y = rng.integers(0, n_out, n).astype(np.int64)
    return X, y


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_gather_gives_the_rows_of_fancy_indexing_in_reused_buffers(rng, batch):
    X, y = _data(rng, 53, 37, 5)  # 53 rows: batch 7 and 32 end in a partial batch
    Y2 = rng.normal(size=(53, 3)).astype(np.float64)  # 2-D targets (regression, one-hot)
    order = rng.permutation(len(X))
    gather, gather2 = BatchGather(X, y, batch), BatchGather(X, Y2, batch)
    first = None
    for start in range(0, len(X), batch):
        idx = order[start : start + batch]
        xb, yb = gather(idx)
        np.testing.assert_array_equal(xb, X[idx])
        np.testing.assert_array_equal(yb, y[idx])
        assert xb.dtype == X.dtype and yb.dtype == y.dtype and xb.flags.c_contiguous
        if first is None:
            first = xb
        assert np.shares_memory(xb, first)  # the same buffer every step, partial batch included
        _, yb2 = gather2(idx)
        np.testing.assert_array_equal(yb2, Y2[idx])
        assert yb2.shape == (len(idx), 3)


def test_gather_refuses_rows_outside_the_data(rng):
    X, y = _data(rng, 10, 4, 3)
    gather = BatchGather(X, y, 4)
    with pytest.raises(IndexError, match=r"integers in \[0, 10\)"):
        gather(np.array([0, 10]))
    with pytest.raises(IndexError, match=r"integers in \[0, 10\)"):
        gather(np.array([-1, 2]))
    with pytest.raises(IndexError, match="integers"):
        gather(np.array([0.0, 1.0]))
    order = np.arange(12)  # an epoch's order with rows that do not exist: caught at its batch
    with pytest.raises(IndexError, match="to 11"):
        gather(order[:4])
    with pytest.raises(ValueError, match="a batch of 5 rows"):
        gather(np.arange(5))
    with pytest.raises(ValueError, match="X has 10 rows and Y 9"):
        BatchGather(X, y[:9], 4)


def test_the_device_gather_reuses_its_buffers_and_allocates_nothing_per_step(rng):
    """On the (emulated) GPU: the rows of fancy indexing, in the same device buffers every
    step, the indices uploaded into one index buffer; bounds checked on the host first."""
    skip_unless_available("cupy")
    from cudaemu import _common

    be = gpubp.get_backend("cupy")
    X, y = _data(rng, 53, 37, 5)
    Xd, yd = be.asarray(X, "float32"), be.xp.asarray(y)
    gather = BatchGather(Xd, yd, 8, xp=be.xp)
    order = rng.permutation(len(X))
    first = gather(order[:8])[0]
    allocs = _common.stats["alloc"]
    for start in range(0, len(X), 8):
        idx = order[start : start + 8]
        xb, yb = gather(idx)
        np.testing.assert_array_equal(be.to_numpy(xb), X[idx])
        np.testing.assert_array_equal(be.to_numpy(yb), y[idx])
        assert xb.data.ptr == first.data.ptr  # the same buffer, partial batch included
    assert _common.stats["alloc"] == allocs  # nothing allocated on the device per step
    before = be.to_numpy(xb).copy()
    with pytest.raises(IndexError, match=r"integers in \[0, 53\)"):
        gather(np.array([0, 53]))
    np.testing.assert_array_equal(be.to_numpy(xb), before)  # a refused batch changes nothing


def test_an_order_is_checked_once_and_a_changed_order_again(rng):
    X, y = _data(rng, 10, 4, 3)
    gather = BatchGather(X, y, 5)
    good = rng.permutation(10)
    gather(good[:5])
    gather(good[5:])
    bad = good.copy()
    bad[7] = 99
    with pytest.raises(IndexError):
        gather(bad[:5])  # a new order: checked whole, so its bad row is found at once


@pytest.mark.parametrize("batch", [1, 6, 40])
def test_fit_with_gathered_batches_matches_fancy_indexing_bit_for_bit(rng, backend_name, batch):
    """MLP.fit (buffers) against the same loop fed ``X[idx]``: the same parameters, bitwise,
    with batch 1 and a partial last batch (40 rows in batches of 6)."""
    X, y = _data(rng, 40, 19, 4)
    X /= np.abs(X).max(axis=1, keepdims=True)  # large raw values, trainable scale
    kw = dict(backend=backend_name, dtype="float32", seed=3)
    fitted = gpubp.MLP([19, 33, 4], **kw)
    fitted.fit(X, y, epochs=2, batch_size=batch, optimizer=Adam(lr=1e-2), progress=False)

    plain = gpubp.MLP([19, 33, 4], **kw)
    opt = Adam(lr=1e-2)
    Xd, yd = plain.check_x(X), plain.check_y(y, len(X))  # on the device, as fit puts them
    loop = EpochLoop(plain.backend, len(X), batch, 2, progress=False, echo=None)
    loop.run(
        lambda idx: plain.step(Xd[idx], yd[idx], opt),
        lambda: plain._rng.permutation(len(X)),
        lambda end: "",
    )
    (Wf, bf), (Wp, bp) = fitted.get_parameters(), plain.get_parameters()
    for a, b in zip([*Wf, *bf], [*Wp, *bp]):
        np.testing.assert_array_equal(a, b)


def test_pending_losses_are_folded_every_so_often_into_the_same_sum(rng):
    """At most ``fold`` values wait for a read (an epoch without a progress bar would keep one
    device scalar per step), and the sum is bit for bit the one read at the end."""
    from gpubp.loop import LossSum

    be = gpubp.get_backend("numpy")
    values = rng.normal(size=23) * 10.0 ** rng.integers(-8, 8, 23)
    weights = rng.integers(1, 100, 23)
    folded, once = LossSum(be, total=0.5, fold=4), LossSum(be, total=0.5, fold=10**9)
    for v, w in zip(values, weights):
        folded.add(v, int(w))
        once.add(v, int(w))
        assert len(folded.values) <= 4
    assert folded.read() == once.read()
