"""Where the numba backend's step spends its time above the GEMM floor: the step built up
part by part, each part run natively (no Python between the steps), interleaved over nine
rounds in one process; the best round of each.

A float32 ReLU classifier, its training set 60,000 random rows in a shuffled order (the
batches come from all over it, as in a real epoch):

- ``floor``: the step's GEMMs (forward ``a @ W.T``, ``delta.T @ a``, ``delta @ W``) on one
  batch already in cache, through the GEMM provider: ``step_ratio.py``'s floor, without its
  Python between the GEMMs;
- ``gather + GEMMs``: each step's batch gathered from the training set first, then the same
  GEMMs on it: what any step must at least do;
- ``gather + GEMMs + update``: then the rule's update as the step writes it: plain SGD folded
  into the weight-gradient GEMMs (``beta = 1`` on the weights), or the checked update of
  momentum SGD or Adam over every parameter (its proof holds: one write pass);
- ``step kernel``: the whole step as ``MLP.fit`` runs it (:mod:`gpubp.backends.numba.multistep`:
  gather, forward, loss, deltas, bounds, update), 20 steps a call, as below;
- ``fit``: ``MLP.steps``, 20 batches a call from Python (``step_ratio.py``'s ``fit``).

Every row but the floor takes its batches from all over the shuffled set, each round from a
new place in it.

The last three rows minus the one above each say what that part costs in context. Where
``gather + GEMMs + update`` is already above a target ratio, no change to the passes between
the GEMMs can meet it::

    python benchmarks/step_parts.py 784,512,256,10 128 adam
    python benchmarks/step_parts.py 784,128,10 64 sgd
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from numba import njit
from step_ratio import RULES, arguments  # (this folder is on the path of a script run here)

import gpubp
from gpubp.backends.numba import gemm as provider
from gpubp.backends.numba import multistep
from gpubp.backends.numba.checked import PROVED, adam_step_par, sgd_step_par
from gpubp.backends.numba.gemm import gemm
from gpubp.backends.numba.step import fold_scalars
from gpubp.backends.numba.update import keep_maxima, step_scalars
from gpubp.backends.update import MAXIMA

ROWS, ROUNDS, STEPS = 60_000, 9, 160  # STEPS: a multiple of 20 (the rows of 20-step calls)


@njit(cache=False, nogil=True)
def _gemms(a, Ws, dWs, d, fold, lr):  # type: ignore[no-untyped-def]
    """The step's GEMMs: ``a[i + 1] = a[i] @ W[i].T``, then ``dW[i] = d[i + 1].T @ a[i]`` and
    ``d[i] = d[i + 1] @ W[i]`` from the last layer down; with ``fold``, SGD folded into the
    weight gradients instead (``W[i] = -lr d[i + 1].T @ a[i] + W[i]``)."""
    B, L = a[0].shape[0], len(Ws)
    for i in range(L):
        n_out, n_in = Ws[i].shape
        gemm(False, True, B, n_out, n_in, 1.0, a[i], n_in, Ws[i], n_in, 0.0, a[i + 1], n_out)
    for i in range(L - 1, -1, -1):
        n_out, n_in = Ws[i].shape
        target = Ws[i] if fold else dWs[i]
        alpha, beta = (-lr, 1.0) if fold else (1.0, 0.0)
        gemm(True, False, n_out, n_in, B, alpha, d[i + 1], n_out, a[i], n_in, beta, target, n_in)
        if i > 0:
            gemm(False, False, B, n_in, n_out, 1.0, d[i + 1], n_out, Ws[i], n_in, 0.0, d[i], n_in)


@njit(cache=False, nogil=True)
def _built_up(  # type: ignore[no-untyped-def]
    part, first, n, X, order, a, Ws, dWs, d, fold, update, cols, wide, known, lim, plan
):
    """``n`` steps of part ``part`` from batch ``first`` on: 0 the floor, 1 the gather and the
    GEMMs, 2 and the update (its proof holding: ``|g| <= 1``). Returns the update's last status:
    :data:`PROVED` (one write pass a step) or what stopped it."""
    B = a[0].shape[0]
    batches = order.shape[0] // B
    status = PROVED
    for s in range(first, first + n):
        if part >= 1:
            multistep._rows(X, order, (s % batches) * B, a[0])
        _gemms(a, Ws, dWs, d, fold and part >= 2, 1e-3)
        if part >= 2 and not fold:
            kept = known.copy()  # the same proof each step: the state's maxima as they were
            status = update(cols, wide, kept, lim, plan)
            if status != PROVED:
                return status
    return status


@njit(cache=False, nogil=True)
def _adam(cols, wide, known, lim, plan):  # type: ignore[no-untyped-def]
    return adam_step_par(cols[0], cols[1], cols[2], cols[3], wide, 1.0, known, lim, plan)


@njit(cache=False, nogil=True)
def _sgd(cols, wide, known, lim, plan):  # type: ignore[no-untyped-def]
    return sgd_step_par(cols[0], cols[1], cols[2], wide, 1.0, known, lim, plan)


def _time(runs: dict[str, Any]) -> dict[str, float]:
    """Seconds per step of each ``run(steps)``, the best of :data:`ROUNDS` interleaved rounds."""
    for run in runs.values():
        run(20)
    best = dict.fromkeys(runs, np.inf)
    for _ in range(ROUNDS):
        for name, run in runs.items():
            t = time.perf_counter()
            run(STEPS)
            best[name] = min(best[name], (time.perf_counter() - t) / STEPS)
    return best


def _known(state: dict[str, Any]) -> np.ndarray:
    """The checked kernels' ``known`` from the state's kept maxima (its proof applies)."""
    known = np.zeros(4)
    maxima = state.get(MAXIMA, ())
    known[0] = 1.0
    known[1 : 1 + len(maxima)] = maxima
    return known


def main() -> None:
    p, args = arguments(__doc__.split("\n\n")[0])
    sizes, B = [int(s) for s in args.sizes.split(",")], args.batch
    if len(sizes) < 3 or min(sizes) < 2 or not 1 <= B <= ROWS // STEPS:
        p.error(f"need at least three sizes of 2 or more and a batch of 1 to {ROWS // STEPS}")
    rng = np.random.default_rng(0)
    model = gpubp.MLP(sizes, activation="relu", backend="numba", dtype="float32", seed=0)
    opt = RULES[args.optimizer]()
    X = model.prepare_x(rng.standard_normal((ROWS, sizes[0])).astype(np.float32))
    y = model.check_y(rng.integers(0, sizes[-1], ROWS), ROWS)
    order = rng.permutation(ROWS)
    batches = ROWS // B
    calls = [0]

    def start() -> int:
        """The first batch of the next 20 (each row walks through the whole shuffled set)."""
        calls[0] += 1
        return calls[0] * 20 % (batches - 20)

    def fit(steps: int) -> None:
        for _ in range(steps // 20):
            took = model.steps(X, y, order, start(), 20, B, opt, [opt.lr] * 20)
            if took is None or len(took) != 20:
                raise SystemExit(f"MLP.steps took {took and len(took)} of 20 steps here")

    fit(40)  # compiles, and keeps the state's maxima for the update's proof
    backend: Any = model.backend
    net = next(iter(backend._nets.values()))
    state = opt.bind(model, backend, model.parameter_shapes, model.dtype)
    plan = backend._update_plan(opt, net.params, net.grads, [state[s] for s in opt.slots])
    if plan is None or not plan.extra:
        raise SystemExit("the update runs on one thread here: nothing to take apart")
    fold = args.optimizer == "sgd"
    # the rule's scalars with a zero step (alpha or lr 0): the parameters keep their values,
    # so every row does the same arithmetic at every step, and the update writes all it would
    wide = np.array(step_scalars(plan.kind, opt, int(state["step"]) + 1))
    wide[5 if plan.kind == "adam" else 0] = 0.0
    a = (net.ws.a[0], *(np.empty((B, n), np.float32) for n in sizes[1:]))
    d = tuple(np.full((B, n), 1e-9, np.float32) for n in sizes)  # |dW| <= B 1e-9 max|a|
    Ws = tuple(w.copy() for w in net.Ws)  # the folded rows write into copies
    # the update row writes copies of the optimizer state (its parameters keep their values),
    # so the state the step kernel and fit train stays theirs, its kept maxima true
    cols = (*plan.cols[:2], *(tuple(c.copy() for c in col) for col in plan.cols[2:]))
    if not opt.slots:
        cols = (*plan.cols[:2], plan.cols[0])
    threads = backend.kernel_threads()  # the count the plan was made for: every native row's

    def part(k: int) -> Any:
        def run(steps: int) -> None:
            W = Ws if fold or k < 2 else net.Ws
            args = (X, order, a, W, net.dWs, d, fold, _adam if plan.kind == "adam" else _sgd)
            args += (cols, wide, _known(state), plan.limits, plan.extra[0])
            with backend._threads(threads):
                if _built_up(k, start(), steps, *args) != PROVED:
                    raise SystemExit("the update's proof did not hold: the row would mislead")

        return run

    def kernel(steps: int) -> None:
        with backend._threads(threads):
            for _ in range(steps // 20):
                kernel_steps(net, X, y, order, start(), opt, state, plan, fold)

    runs = {
        "floor": part(0),
        "gather + GEMMs": part(1),
        "gather + GEMMs + update": part(2),
        "step kernel": kernel,
        "fit": fit,
    }
    best = _time(runs)
    name = provider.PROVIDER.name if provider.PROVIDER else "matmul"
    print(f"{name} {sizes} batch {B} {args.optimizer}, ms per step (best of {ROUNDS} rounds):")
    before = best["floor"]
    for row, t in best.items():
        print(
            f"  {row:<24} {t * 1e3:7.3f}  {t / best['floor']:5.2f}x floor"
            f"  {(t - before) * 1e6:+7.1f} us"
        )
        before = t


def kernel_steps(
    net: Any, X: Any, y: Any, order: Any, first: int, opt: Any, state: Any, plan: Any, fold: bool
) -> None:
    """20 steps of the step kernel of :mod:`gpubp.backends.numba.multistep` in one call from
    batch ``first`` on, as ``MLP.steps`` makes it, at the rule's scalars of the state's next
    step (the model is trained by them), the proof applying as in ``MLP.fit``."""
    ws, steps = net.ws, 20
    out, progress = np.empty(steps), np.zeros(1, dtype=np.int64)
    common = (X, y, ws.no_y, order, first * ws.batch, steps, ws.a[0], ws.labels, ws.no_y)
    common += (net.Ws, net.bs)
    common += (net.acts, ws.z_out, net.ds)
    if fold:
        sgds = np.array([fold_scalars(net, float(opt.lr), 0.0)] * steps)
        done = multistep.fold_steps(*common, net.dbs, *net.ids, ws.cm, sgds, out, progress)
    else:
        step = int(state["step"])
        wides = np.array([step_scalars(plan.kind, opt, step + 1 + s) for s in range(steps)])
        run = multistep.adam_steps if plan.kind == "adam" else multistep.sgd_steps
        known, statuses = _known(state), np.zeros(steps, dtype=np.int64)
        done = run(
            *common, net.dWs, net.dbs, *net.ids, ws.cm, plan.cols, wides, known, True,
            plan.limits, plan.extra[0], out, statuses, progress,
        )  # fmt: skip
        keep_maxima(state, plan.kind, known)  # these steps trained the model: as fit keeps them
        state["step"] = step + int(progress[0])
        if (statuses[:done] != PROVED).any():
            raise SystemExit("the step kernel's update was not proved: one pass more than fit")
    if done != steps:
        raise SystemExit(f"the step kernel took {done} of {steps} steps here")


if __name__ == "__main__":
    main()
