"""Loss names, which output each one pairs with, and what counts as a classifier.

The formulas (see docs/DESIGN.md; ``B`` is the batch size, ``a = f(z)`` the output, ``Y`` the
``(B, n)`` targets, integer labels meaning one-hot rows):

=====================  ==========  ===================================  =======================
loss                   output      C                                    delta^L
=====================  ==========  ===================================  =======================
mse                    any         1/(2B) sum (a - Y)^2                 J_f^T (a - Y) / B
cross_entropy          softmax     -1/B sum Y log a                     (a - Y) / B
binary_cross_entropy   sigmoid     -1/B sum Y log a + (1-Y) log(1-a)    (a - Y) / B
poisson                exp         1/B sum Y log(Y/a) - Y + a           (a - Y) / B
=====================  ==========  ===================================  =======================

``poisson`` (half the Poisson deviance, ``0 log 0 = 0``, targets ``Y >= 0``) is a loss of the
backends' ops, which scikit-learn's ``MLPRegressor(loss='poisson')`` runs on; :class:`gpubp.MLP`
takes the losses of ``LOSSES``.

``J_f^T g`` is ``g * f'(z)`` for elementwise outputs and ``a * (g - sum_j g_j a_j)`` for
softmax.
"""

from __future__ import annotations

from .activations import OUTPUT_ACTIVATIONS

#: Loss name -> the outputs it is defined for.
LOSSES: dict[str, tuple[str, ...]] = {
    "mse": OUTPUT_ACTIVATIONS,
    "cross_entropy": ("softmax",),
    "binary_cross_entropy": ("sigmoid",),
}


def check_combination(loss: object, output: str) -> str:
    """Return ``loss`` if it is known and defined for ``output``, else raise ValueError."""
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not supported; expected one of {', '.join(LOSSES)}")
    if output not in LOSSES[loss]:
        hint = {
            "cross_entropy": "use output='softmax' (or loss='mse')",
            "binary_cross_entropy": "use output='sigmoid' (or loss='mse')",
        }[loss]
        pairs = [name for name, outs in LOSSES.items() if output in outs]
        raise ValueError(
            f"loss={loss!r} is not defined for output={output!r}; {hint}. Losses that work "
            f"with output={output!r}: {', '.join(pairs)}"
        )
    return loss


def is_classifier(loss: str, n_outputs: int) -> bool:
    """Whether predictions are class labels: the log-losses, and MSE with several outputs."""
    return loss != "mse" or n_outputs > 1
