"""The optimizer step of :class:`~gpubp.backends.base.Backend`, written against ``xp``.

Two layers:

- the ops :meth:`UpdateOps.sgd_update` and :meth:`UpdateOps.adam_update` apply one rule to one
  parameter, in place, or into given ``out=`` arrays (the inputs are then left as they were);
- :meth:`UpdateOps.checked_update` applies the optimizer to every parameter only if every new
  parameter and every new state value is finite. It computes them all into staging arrays
  first (kept per model, so a steady-state step allocates nothing), checks them (one reduction
  per array), and only then copies them over the parameters and state. A rejected step raises
  :class:`~gpubp.errors.NonFiniteLossError` and leaves everything as it was. A NaN or infinite
  gradient makes its new parameter non-finite, so the gradients are covered by the same check.

  The Numba backend overrides it with one write pass where it can prove the step finite
  (:mod:`.numba.update`); the proof's state maxima live in the state dict under
  :data:`MAXIMA`, and every path here that writes the state drops them.

The arithmetic stays in the arrays' dtype: the scalars are Python floats, which NumPy (2.x)
and CuPy cast to the array's dtype instead of promoting the array.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np

from ..errors import NonFiniteLossError
from ..optim import adam_scalars

#: The key of the optimizer state's maxima in a state dict (set by the Numba backend's write
#: pass for its proof; dropped by every other writer of the state, so a stale value is never
#: used).
MAXIMA = "maxima"


class UpdateOps:
    """The update ops and the checked step; a mixin of :class:`~gpubp.backends.base.Backend`,
    which provides ``xp`` and :meth:`check_finite`."""

    xp: Any
    _stagings: OrderedDict[Any, tuple[list[tuple[Any, ...]], Any]]
    #: Staging arrays kept for this many models (parameter shapes, dtype, state slots).
    max_stagings = 2

    def check_finite(self, value: Any, dWs: list[Any], dbs: list[Any]) -> None:
        raise NotImplementedError  # pragma: no cover - Backend's

    def check_loss(self, value: Any) -> None:
        raise NotImplementedError  # pragma: no cover - Backend's

    def to_numpy(self, a: Any) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover - Backend's

    def gradients(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        activation: str,
        output: str,
        loss: str,
    ) -> tuple[Any, list[Any], list[Any]]:
        raise NotImplementedError  # pragma: no cover - Backend's

    def shard_gradients(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        spec: tuple[str, str, str],
        share: float,
        grads: list[Any],
        loss_out: Any,
    ) -> None:
        """A data-parallel rank's share of the gradients, written into kept buffers.

        With ``C`` the mean loss of the shard ``x`` ``(g, n_0)``, ``y`` and ``spec``
        ``(activation, output, loss)``: ``grads[i] = share * dC/dtheta_i`` (``theta`` =
        ``[*weights, *biases]``, each product in the parameters' dtype, ``grads[i]`` of
        ``theta_i``'s shape) and ``loss_out[0] = share * C`` (the product in float64, rounded
        once to ``loss_out``'s dtype), on the backend's device, nothing read."""
        value, dWs, dbs = self.gradients(weights, biases, x, y, *spec)
        xp = self.xp
        for dst, g in zip(grads, [*dWs, *dbs]):
            xp.multiply(g, share, out=dst)
        xp.multiply(value, share, out=loss_out[:1], dtype=np.float64)

    def sgd_update(
        self,
        param: Any,
        grad: Any,
        buf: Any,
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        *,
        scratch: Any = None,
        out: tuple[Any, Any] | None = None,
    ) -> tuple[Any, Any]:
        """SGD step on one parameter ``(n, ...)``; see :func:`gpubp.reference.sgd_update`.

        ``g' = grad + wd p``; with momentum ``buf' = mu buf + g'`` and
        ``p' = p - lr (g' + mu buf')`` (Nesterov) or ``p' = p - lr buf'``; else
        ``p' = p - lr g'``. Written in place into ``param`` and ``buf``, or into
        ``out = (p', buf')`` (arrays of their shapes; ``buf'`` None without momentum), leaving
        the inputs unchanged. ``scratch``: an optional flat buffer of at least
        ``2 * param.size`` elements. Returns ``(p', buf')``.
        """
        xp = self.xp
        p_out, b_out = (param, buf) if out is None else out
        s = self._pscratch(param, scratch, 0)
        g = grad
        if weight_decay:
            xp.multiply(param, weight_decay, out=s)
            s += grad
            g = s
        if momentum:
            xp.multiply(buf, momentum, out=b_out)
            b_out += g
            if nesterov:  # p' = p - lr g' - lr mu buf'
                xp.multiply(g, lr, out=s)
                xp.subtract(param, s, out=p_out)
                xp.multiply(b_out, lr * momentum, out=s)
                p_out -= s
                return p_out, b_out
            xp.multiply(b_out, lr, out=s)
        else:
            xp.multiply(g, lr, out=s)
        xp.subtract(param, s, out=p_out)
        return p_out, b_out

    def adam_update(
        self,
        param: Any,
        grad: Any,
        m: Any,
        v: Any,
        step: int,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        *,
        scratch: Any = None,
        out: tuple[Any, Any, Any] | None = None,
    ) -> tuple[Any, Any, Any]:
        """Adam / AdamW step on one parameter; see :func:`gpubp.reference.adam_update`.

        ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2`` and, with ``t = step``,
        ``p' = p shrink - lr / (1 - b1^t) m' / (sqrt(v' / (1 - b2^t)) + eps)``, computed as
        ``p shrink - [lr sqrt(1 - b2^t) / (1 - b1^t)] m' / (sqrt(v') + eps sqrt(1 - b2^t))``
        (one pass fewer). Adam: ``g = grad + wd p``, ``shrink = 1``; AdamW (``decoupled``):
        ``g = grad``, ``shrink = 1 - lr wd``. In place into ``param``, ``m``, ``v``, or into
        ``out = (p', m', v')``, leaving the inputs unchanged. ``scratch``: an optional flat
        buffer of at least ``2 * param.size`` elements. Returns ``(p', m', v')``.
        """
        xp = self.xp
        p_out, m_out, v_out = (param, m, v) if out is None else out
        k = adam_scalars(step, lr, beta1, beta2, eps, weight_decay, decoupled)
        s1 = self._pscratch(param, scratch, 0)
        s2 = self._pscratch(param, scratch, 1)
        g = grad
        if weight_decay and not decoupled:
            xp.multiply(param, weight_decay, out=s1)
            s1 += grad
            g = s1
        xp.multiply(m, k.b1, out=m_out)
        xp.multiply(g, k.omb1, out=s2)
        m_out += s2
        xp.multiply(g, g, out=s2)
        s2 *= k.omb2
        xp.multiply(v, k.b2, out=v_out)
        v_out += s2
        xp.sqrt(v_out, out=s2)
        s2 += k.eps_hat
        xp.divide(m_out, s2, out=s2)
        s2 *= k.alpha
        if weight_decay and decoupled:
            xp.multiply(param, k.shrink, out=p_out)
            p_out -= s2
        else:
            xp.subtract(param, s2, out=p_out)
        return p_out, m_out, v_out

    def sgd_update_many(
        self,
        params: list[Any],
        grads: list[Any],
        bufs: list[Any],
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decays: list[float],
        *,
        scratch: list[Any] | None = None,
    ) -> None:
        """:meth:`sgd_update` in place on every tensor ``params[i]``, with its own
        ``weight_decays[i]`` (``bufs[i]`` unused, may be None, without momentum); a backend may
        take them all in one call. ``scratch``: optional per-tensor buffers."""
        for i, (p, g, buf, wd) in enumerate(zip(params, grads, bufs, weight_decays)):
            s = None if scratch is None else scratch[i]
            self.sgd_update(p, g, buf, lr, momentum, nesterov, wd, scratch=s)

    def adam_update_many(
        self,
        params: list[Any],
        grads: list[Any],
        ms: list[Any],
        vs: list[Any],
        step: int,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decays: list[float],
        decoupled: bool,
        *,
        scratch: list[Any] | None = None,
    ) -> None:
        """:meth:`adam_update` in place on every tensor ``params[i]``, with its own
        ``weight_decays[i]``; a backend may take them all in one call. ``scratch``: optional
        per-tensor buffers."""
        for i, (p, g, m, v, wd) in enumerate(zip(params, grads, ms, vs, weight_decays)):
            s = None if scratch is None else scratch[i]
            self.adam_update(p, g, m, v, step, lr, beta1, beta2, eps, wd, decoupled, scratch=s)

    def _pscratch(self, param: Any, scratch: Any, k: int) -> Any:
        if scratch is None:
            return self.xp.empty_like(param)
        n = param.size
        return scratch[k * n : (k + 1) * n].reshape(param.shape)

    def update_parameters(
        self,
        params: list[Any],
        grads: list[Any],
        optimizer: Any,
        state: dict[str, Any],
        *,
        scratch: Any = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        """Apply ``optimizer`` to every parameter in place (order ``W^1..W^L, b^1..b^L``),
        unchecked: what the rule gives is written, NaN included.

        The optimizer calls this backend's own op (``sgd_update``, ``adam_update``) on each
        parameter. ``state["step"]`` is incremented, and each slot array updated in place.
        """
        state.pop(MAXIMA, None)  # the state is written here unchecked
        _, new_state = optimizer.update(self, params, grads, state, scratch=scratch)
        state["step"] = new_state["step"]
        return params, state

    def checked_update(
        self,
        value: Any,
        params: list[Any],
        grads: list[Any],
        optimizer: Any,
        state: dict[str, Any],
        *,
        scratch: Any = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        """:meth:`update_parameters`, but only if every new parameter and state value is finite.

        The new values are computed into staging arrays, checked, then copied over the
        parameters and state. Otherwise :class:`~gpubp.errors.NonFiniteLossError` is raised
        (naming the gradient if one is not finite, else the parameter) and nothing is changed.
        ``value`` is the loss, for the message.
        """
        xp = self.xp
        state.pop(MAXIMA, None)  # the state is written here, not by the pass that took them
        outs, own_scratch = self._staging(params, optimizer)
        scratch = own_scratch if scratch is None else scratch
        with np.errstate(over="ignore", invalid="ignore"):  # NumPy's warnings: the check says it
            optimizer.update(self, params, grads, state, scratch=scratch, outs=outs)
            bad = [i for i, row in enumerate(outs) if not all(_all_finite(xp, a) for a in row)]
        if bad:
            raise self._rejected(value, params, grads, optimizer, bad[0])
        slots = [state.get(s) for s in optimizer.op_slots]
        for i, (p, row) in enumerate(zip(params, outs)):
            xp.copyto(p, row[0])
            for k, col in enumerate(slots):
                if col is not None and row[k + 1] is not None:
                    xp.copyto(col[i], row[k + 1])
        state["step"] = int(state["step"]) + 1
        return params, state

    def reduced_update(
        self,
        tail: Any,
        params: list[Any],
        grads: list[Any],
        optimizer: Any,
        state: dict[str, Any],
        *,
        scratch: Any = None,
    ) -> np.ndarray:
        """The update of a data-parallel step after its all-reduce, in one read of ``tail``.

        ``tail``: the reduced buffer's values after the gradients (which ``grads`` view), the
        loss first and a slot of the backend's own last (a device backend writes its verdict
        there, so that the one read brings it too). Read to the host, then the loss's check and
        :meth:`checked_update`, as :meth:`~gpubp.backends.base.Backend.apply_update` does:
        :class:`~gpubp.errors.NonFiniteLossError` and nothing changed unless every value is
        finite. Returns the tail as read (a copy).
        """
        host = np.array(self.to_numpy(tail))
        value = float(host[0])
        self.check_loss(value)
        self.checked_update(value, params, grads, optimizer, state, scratch=scratch)
        return host

    def _staging(self, params: list[Any], optimizer: Any) -> tuple[list[tuple[Any, ...]], Any]:
        """Per parameter ``(p', slot'...)`` arrays (None for an absent slot), and a flat scratch
        buffer for the ops (twice the largest parameter), kept per model."""
        have = set(optimizer.slots)
        key = (
            tuple(tuple(p.shape) for p in params),
            params[0].dtype,
            tuple(s in have for s in optimizer.op_slots),
        )
        cache = self._stagings
        staged = cache.get(key)
        if staged is None:
            empty = self.xp.empty_like
            outs = [
                (empty(p), *(empty(p) if s in have else None for s in optimizer.op_slots))
                for p in params
            ]
            biggest = max(int(p.size) for p in params)
            staged = cache[key] = (outs, self.xp.empty(2 * biggest, dtype=params[0].dtype))
            while len(cache) > self.max_stagings:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return staged

    def _rejected(
        self, value: Any, params: list[Any], grads: list[Any], optimizer: Any, i: int
    ) -> NonFiniteLossError:
        """The error for a step whose update of parameter ``i`` (or its state) is not finite:
        the gradient's (raised by :meth:`check_finite`) if one is not finite, else this one."""
        L = len(grads) // 2
        self.check_finite(value, grads[:L], grads[L:])  # raises if a gradient is to blame
        name = f"W[{i}]" if i < L else f"b[{i - L}]"
        dtype = params[i].dtype
        return NonFiniteLossError(
            f"the update would make {name} or its optimizer state NaN or infinite in {dtype} "
            f"(the loss {float(value):.6g} and every gradient are finite; lr={optimizer.lr:g}); "
            "the step was skipped and the parameters and optimizer state kept. Lower the "
            "learning rate"
        )


def _all_finite(xp: Any, a: Any) -> bool:
    """Whether ``a`` (or None) holds no NaN or infinity: one sum, confirmed elementwise only if
    the sum is not finite (finite values whose sum overflows)."""
    return a is None or math.isfinite(float(xp.sum(a))) or bool(xp.isfinite(a).all())
