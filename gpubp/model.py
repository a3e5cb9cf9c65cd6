"""The user-facing model: :class:`MLP`.

Every public method validates its input before touching anything, so a rejected call leaves the
parameters and optimizer state exactly as they were.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import activations as act
from . import interop, modelfile
from ._checks import check_int, check_positive_int
from .backends import Backend, get_backend, to_numpy
from .budget import check_network
from .loop import EpochEnd, EpochLoop, OneCaller
from .losses import check_combination, is_classifier
from .model_inputs import InputChecks, check_dtype, check_layer_sizes, check_optimizer, check_run
from .optim import Adam, Optimizer
from .preprocessing import Preprocessing
from .sparse_inputs import (
    SparseRows,
    batch_gather,
    sparse_gradients,
    sparse_logits,
    sparse_train_step,
)

__all__ = ["MLP"]


class MLP(InputChecks):
    """A fully connected network trained by backpropagation on the backend of your choice.

    Parameters
    ----------
    layer_sizes : sequence of int
        ``[n_0, n_1, ..., n_L]``: input width, hidden widths, output width (at least two).
    activation : str
        Hidden activation: ``identity``, ``sigmoid``, ``tanh``, ``relu``, ``leaky_relu``.
    output : str
        Output activation: ``identity``, ``sigmoid``, ``tanh``, ``relu``, ``softmax``.
    loss : str
        ``mse`` (any output), ``cross_entropy`` (softmax), ``binary_cross_entropy`` (sigmoid).
    backend : str or Backend
        ``numpy``, ``numba``, ``cupy`` or ``auto`` (see :func:`gpubp.get_backend`).
    dtype : str
        ``float32`` or ``float64``: parameters, activations and arithmetic.
    seed : int
        Seeds the initialisation (He normal for the ReLU family, Glorot uniform otherwise,
        biases zero) and the shuffling in :meth:`fit`.
    preprocessing : Preprocessing, optional
        Applied to every input first, ``x' = (x - shift) * scale`` (see :attr:`preprocessing`).

    Notes
    -----
    Layer ``l`` holds ``W^l`` ``(n_l, n_{l-1})`` and ``b^l`` ``(n_l,)``; the forward pass is
    ``a^0 = (x - shift) * scale`` (or ``x`` without preprocessing), then
    ``a^l = f(a^{l-1} @ W^l.T + b^l)`` on batches ``(B, n)``; losses are means over the batch.
    Inputs may be NumPy arrays, nested lists, or any DLPack array (PyTorch, JAX, CuPy): read
    without a copy where they live on the backend's device (:mod:`gpubp.dlpack`); or scipy.sparse
    matrices and arrays (CSR, CSC, COO), never densified: the first layer's products run on
    each batch's CSR rows (:mod:`gpubp.sparse_inputs`).

    One thread at a time may train or update a model (:meth:`fit`, :meth:`train_step`,
    :meth:`set_parameters`): a second is refused with
    :class:`~gpubp.errors.ConcurrentUseError`; give each thread its own model.
    """

    def __init__(
        self,
        layer_sizes: Sequence[int],
        activation: str = "relu",
        output: str = "softmax",
        loss: str = "cross_entropy",
        backend: str | Backend = "auto",
        dtype: str = "float32",
        seed: int | None = 0,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        self.layer_sizes = check_layer_sizes(layer_sizes)
        self.activation = act.check_activation(
            activation, argument="activation", allowed=act.HIDDEN_ACTIVATIONS
        )
        self.output = act.check_activation(
            output, argument="output", allowed=act.OUTPUT_ACTIVATIONS
        )
        self.loss = check_combination(loss, self.output)
        if self.loss == "cross_entropy" and self.layer_sizes[-1] < 2:
            raise ValueError(
                "loss='cross_entropy' needs at least 2 outputs (a softmax over one output is "
                "always 1); for a yes/no label use output='sigmoid', "
                "loss='binary_cross_entropy'"
            )
        self.dtype = check_dtype(dtype)
        self.seed = check_int("seed", seed, allow_none=True)
        check_network(self.layer_sizes, self.dtype.itemsize)  # before any of it is allocated
        self.backend = get_backend(backend)
        self._busy = OneCaller()  # one thread at a time in fit, step and set_parameters
        self._rng = np.random.default_rng(seed)
        weights, biases = act.initial_parameters(
            self.layer_sizes, self.activation, self.output, np.random.default_rng(seed)
        )
        self._W = [self.backend.asarray(w, self.dtype) for w in weights]
        self._b = [self.backend.asarray(b, self.dtype) for b in biases]
        self._pre: Preprocessing | None = None
        self._pre_arrays: tuple[Any, Any] | None = None
        self.preprocessing = preprocessing
        #: the dataset it was trained on, its label names and (a file's) feature and target names
        self.dataset: str | None = None
        self.labels: tuple[str, ...] | None = None
        self.features: tuple[str, ...] | None = None
        self.target: str | None = None

    # --- construction -----------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        """``L``, the number of weight layers."""
        return len(self.layer_sizes) - 1

    @property
    def n_parameters(self) -> int:
        s = self.layer_sizes
        return sum(s[i + 1] * (s[i] + 1) for i in range(self.n_layers))

    def config(self) -> dict[str, Any]:
        """What it takes to rebuild this model (no parameters)."""
        return {
            "layer_sizes": list(self.layer_sizes),
            "activation": self.activation,
            "output": self.output,
            "loss": self.loss,
            "dtype": self.dtype.name,
            "seed": None if self.seed is None else int(self.seed),
        }

    def __repr__(self) -> str:
        return (
            f"MLP({list(self.layer_sizes)}, activation={self.activation!r}, "
            f"output={self.output!r}, "
            f"loss={self.loss!r}, backend={self.backend.name!r}, dtype={self.dtype.name!r})"
        )

    # --- inference --------------------------------------------------------------------------

    def _logits(self, x: Any) -> Any:
        """Output pre-activation ``z^L`` ``(B, n_L)`` on the backend."""
        be = self.backend
        if isinstance(x, SparseRows):
            return sparse_logits(be, self._W, self._b, x, self.activation)
        a = x
        for i in range(self.n_layers - 1):
            a = be.forward_layer(a, self._W[i], self._b[i], self.activation)
        return be.forward_layer(a, self._W[-1], self._b[-1], "identity")

    def _chunks(self, x: Any, batch_size: int) -> Any:
        for start in range(0, x.shape[0], batch_size):
            yield start, x[start : start + batch_size]

    def forward(self, x: Any, batch_size: int = 4096) -> np.ndarray:
        """Network output ``a^L = f(...)`` for raw inputs ``x`` ``(B, n_0)`` (preprocessed first
        when the model carries a :attr:`preprocessing`), as a NumPy ``(B, n_L)`` array.

        ``batch_size`` rows are pushed through at a time, bounding the memory used.
        """
        check_positive_int("batch_size", batch_size)
        x = self.check_x(x)
        out = np.empty((x.shape[0], self.n_outputs), dtype=self.dtype)
        for start, xb in self._chunks(x, batch_size):
            z = self._logits(self._preprocess(xb))
            act.apply_inplace(self.backend.xp, z, self.output)
            out[start : start + xb.shape[0]] = to_numpy(z)
        return out

    def predict(self, x: Any) -> np.ndarray:
        """Predictions for ``x``: class labels ``(B,)`` for classifiers, outputs for regression.

        Softmax outputs and multi-output MSE give the argmax; a single sigmoid output with binary
        cross-entropy gives 0/1 labels ``(B,)``, several give 0/1 per output ``(B, n_L)``; a
        single-output MSE model returns its outputs ``(B, 1)``.
        """
        a = self.forward(x)
        if self.loss == "binary_cross_entropy":
            labels = (a > 0.5).astype(np.int64)
            return labels[:, 0] if self.n_outputs == 1 else labels
        if is_classifier(self.loss, self.n_outputs):
            return np.argmax(a, axis=1)
        return a

    def evaluate(self, x: Any, y: Any, batch_size: int = 4096) -> dict[str, float | None]:
        """Mean loss and accuracy over ``(x, y)``: ``{"loss": ..., "accuracy": ...}``.

        Accuracy is the fraction of correct labels (argmax for softmax and multi-output MSE, a 0.5
        threshold per output for sigmoid with binary cross-entropy); ``None`` for a single-output
        regression. ``x`` is raw: preprocessed first when the model carries a
        :attr:`preprocessing`.
        """
        check_positive_int("batch_size", batch_size)
        x = self.check_x(x)
        y = self.check_y(y, x.shape[0])
        return self._evaluate(x, y, batch_size, raw=True)

    def _evaluate(self, x: Any, y: Any, batch_size: int, raw: bool) -> dict[str, float | None]:
        """:meth:`evaluate` on checked arrays; ``raw=False``: ``x`` is already preprocessed."""
        be, xp = self.backend, self.backend.xp
        classifier = is_classifier(self.loss, self.n_outputs)
        # per batch a loss and a count of correct predictions, kept on the device and read
        # together at the end (on a GPU the counts come from gpubp's metrics kernels)
        losses, rows, hits = [], [], []
        for start, xb in self._chunks(x, batch_size):
            yb = y[start : start + xb.shape[0]]
            z = self._logits(self._preprocess(xb) if raw else xb)
            _, value = be.output_delta(z, yb, self.output, self.loss, out=xp.empty_like(z))
            losses.append(value)
            rows.append(int(xb.shape[0]))
            act.apply_inplace(xp, z, self.output)
            if self.loss == "binary_cross_entropy":
                hits.append(be.threshold_correct(z, yb))
            elif classifier:
                hits.append(be.argmax_correct(z, yb)[1])
        total = sum(float(v) * n for v, n in zip(losses, rows))
        count = sum(rows)
        correct = sum(float(h) for h in hits)
        if self.loss == "binary_cross_entropy":
            correct /= self.n_outputs
        return {"loss": total / count, "accuracy": correct / count if classifier else None}

    # --- training ---------------------------------------------------------------------------

    def gradients(self, x: Any, y: Any) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
        """``(C, dWs, dBs)`` for the batch (raw ``x``, as everywhere), as NumPy copies, without
        updating anything."""
        x = self.prepare_x(x)
        y = self.check_y(y, x.shape[0])
        grads = sparse_gradients if isinstance(x, SparseRows) else type(self.backend).gradients
        value, dWs, dbs = grads(
            self.backend, self._W, self._b, x, y, self.activation, self.output, self.loss
        )
        return (
            float(value),
            [to_numpy(g).copy() for g in dWs],
            [to_numpy(g).copy() for g in dbs],
        )

    def train_step(self, x: Any, y: Any, optimizer: Optimizer) -> float:
        """One step on the batch ``(x, y)``: forward, loss, backward, update. Returns the loss.

        Raises :class:`~gpubp.errors.NonFiniteLossError` (parameters and optimizer state kept)
        when the loss or a gradient comes out NaN or infinite.
        """
        check_optimizer(optimizer)
        x = self.prepare_x(x)
        y = self.check_y(y, x.shape[0])
        with self._busy("train_step"):
            return float(self.step(x, y, optimizer))

    @property
    def parameters(self) -> tuple[list[Any], list[Any]]:
        """``(weights, biases)``: the backend arrays themselves (a train step updates them in
        place); :meth:`get_parameters` gives NumPy copies."""
        return self._W, self._b

    @property
    def parameter_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of ``[W^1, ..., W^L, b^1, ..., b^L]``: the order optimizer state is kept in."""
        return [tuple(W.shape) for W in self._W] + [tuple(b.shape) for b in self._b]

    def step(self, x: Any, y: Any, optimizer: Optimizer) -> Any:
        """:meth:`train_step` on a batch already checked, cast and preprocessed by
        :meth:`prepare_x` and :meth:`check_y` (and an optimizer known to be one): what a
        training loop calls. ``x`` is the network's input ``a^0``: no preprocessing here.

        Returns the loss as the backend gives it, unread: on a GPU a device scalar, so a loop of
        steps never waits for the device (read it with ``float`` or :class:`gpubp.loop.LossSum`).
        """
        busy = self._busy.lock  # held inline: this runs once per training step
        if not busy.acquire(blocking=False):
            raise self._busy.refusal("step")
        try:
            state = optimizer.bind(self, self.backend, self.parameter_shapes, self.dtype)
            if isinstance(x, SparseRows):  # beside the backend's dense step, which is unchanged
                return sparse_train_step(
                    self.backend, self._W, self._b, x, y, self, optimizer, state
                )
            value, _, _, _ = self.backend.train_step(
                self._W, self._b, x, y, self.activation, self.output, self.loss, optimizer, state
            )
        finally:
            busy.release()
        return value

    def steps(
        self,
        X: Any,
        y: Any,
        order: Any,
        first: int,
        count: int,
        batch_size: int,
        optimizer: Optimizer,
        lrs: list[float],
    ) -> list[float] | None:
        """Up to ``count`` steps on the batches ``first, first + 1, ...`` of ``batch_size`` rows
        ``order[...]`` of the whole training set ``(X, y)`` (checked and preprocessed as for
        :meth:`step`), step ``s`` at learning rate ``lrs[s]``, in as few native calls as the
        backend can (:meth:`~gpubp.backends.Backend.train_steps`); their losses. The steps it
        does not take are left to :meth:`step`; None where the backend takes none of them."""
        check_run(X, order, first, count, batch_size, lrs)
        with self._busy("steps"):
            state = optimizer.bind(self, self.backend, self.parameter_shapes, self.dtype)
            return self.backend.train_steps(
                self._W, self._b, X, y, order, first * batch_size, count, batch_size,
                self.activation, self.output, self.loss, optimizer, state, lrs,
            )  # fmt: skip

    def fit(
        self,
        X: Any,
        y: Any,
        epochs: int = 10,
        batch_size: int = 64,
        optimizer: Optimizer | None = None,
        validation_data: tuple[Any, Any] | None = None,
        progress: bool = True,
        shuffle: bool = True,
    ) -> dict[str, list[float]]:
        """Train for ``epochs`` passes over ``(X, y)`` in shuffled mini-batches.

        Returns a history: ``loss`` (mean training loss per epoch), ``time`` (seconds per epoch)
        and, with ``validation_data``, ``val_loss`` and ``val_accuracy``. The default optimizer
        is ``Adam(lr=1e-3)``. ``progress`` prints a line per epoch on stdout, with a live bar on
        stderr when that is a terminal. ``X`` is raw: a :attr:`preprocessing` is applied to all
        of it once (a copy), not per step; without one (set ``Preprocessing.standardize(X)`` for
        features of different scales) it is used as given. ``y``: integer (or whole-number
        float) class labels or one-hot rows; float targets for a regression."""
        check_positive_int("epochs", epochs)
        check_positive_int("batch_size", batch_size)
        optimizer = Adam(lr=1e-3) if optimizer is None else check_optimizer(optimizer)
        X = self.check_x(X, "X")
        y = self.check_y(y, X.shape[0])
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            Xv = self.prepare_x(validation_data[0], "validation_data[0]")
            yv = self.check_y(validation_data[1], Xv.shape[0], "validation_data[1]")
        history: dict[str, list[float]] = {"loss": [], "time": []}

        def end_epoch(end: EpochEnd) -> str:
            history["loss"].append(end.loss)
            history["time"].append(end.seconds)
            summary = f"loss {end.loss:.4f}"
            if validation_data is not None:
                ev = self._evaluate(Xv, yv, 4096, raw=False)
                history.setdefault("val_loss", []).append(float(ev["loss"] or 0.0))
                summary += f"  val_loss {ev['loss']:.4f}"
                if ev["accuracy"] is not None:
                    history.setdefault("val_accuracy", []).append(float(ev["accuracy"]))
                    summary += f"  val_acc {ev['accuracy']:.4f}"
            return f"{summary}  {end.seconds:.2f}s"

        X = self._preprocess(X)  # once for all epochs (every argument was checked above)
        N = X.shape[0]
        loop = EpochLoop(
            self.backend,
            N,
            batch_size,
            epochs,
            progress=progress,
            echo=_print if progress else None,
        )
        check_network(
            self.layer_sizes, self.dtype.itemsize, min(batch_size, N), len(optimizer.slots)
        )
        gather = batch_gather(X, y, batch_size, self.backend)
        with self._busy("fit"):  # held for the whole fit: no other thread's step in between
            loop.run(
                lambda idx: self.step(*gather(idx), optimizer),
                lambda: self._rng.permutation(N) if shuffle else np.arange(N),
                end_epoch,
                steps=lambda order, first, count: self.steps(
                    X, y, order, first, count, batch_size, optimizer, [optimizer.lr] * count
                ),
            )
        return history

    # --- parameters -------------------------------------------------------------------------

    def get_parameters(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(weights, biases)`` as NumPy copies; ``weights[l]`` has shape ``(n_{l+1}, n_l)``."""
        return (
            [to_numpy(W).copy() for W in self._W],
            [to_numpy(b).copy() for b in self._b],
        )

    def set_parameters(self, weights: Sequence[Any], biases: Sequence[Any]) -> None:
        """Replace all parameters; every array is checked before any is replaced."""
        L = self.n_layers
        if not isinstance(weights, Sequence) or len(weights) != L:
            raise ValueError(f"weights must be a list of {L} arrays, one per layer")
        if not isinstance(biases, Sequence) or len(biases) != L:
            raise ValueError(f"biases must be a list of {L} arrays, one per layer")
        new_W: list[Any] = []
        new_b: list[Any] = []
        for i in range(L):
            n_in, n_out = self.layer_sizes[i], self.layer_sizes[i + 1]
            for kind, value, shape, out in (
                ("weights", weights[i], (n_out, n_in), new_W),
                ("biases", biases[i], (n_out,), new_b),
            ):
                arr = self._array(value, f"{kind}[{i}]")
                if tuple(arr.shape) != shape:
                    raise ValueError(
                        f"{kind}[{i}] has shape {tuple(arr.shape)}; expected {shape} for "
                        f"layer_sizes {list(self.layer_sizes)}"
                    )
                arr = self._cast_finite(arr, f"{kind}[{i}]", "pass finite parameters")
                out.append(self.backend.asarray(arr).copy())
        with self._busy("set_parameters"):
            self._W, self._b = new_W, new_b

    # --- files ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the configuration and parameters to ``path`` (a NumPy ``.npz``, no pickle).

        The file also holds the :attr:`preprocessing` (two float64 arrays), and the
        :attr:`dataset`, :attr:`labels`, :attr:`features` and :attr:`target` names. It is
        written beside its destination and renamed into place, so an interrupted save never
        leaves a half-written file under ``path``.
        """
        labels = self.labels
        if labels is not None and len(labels) != self.n_outputs:
            raise ValueError(
                f"labels names {len(labels)} classes for a model with {self.n_outputs} outputs; "
                "set model.labels to one name per output, or None"
            )
        weights, biases = self.get_parameters()
        names = (self.dataset, labels, self.features, self.target)
        modelfile.save_model(path, self.config(), weights, biases, self._pre, *names)

    @classmethod
    def load(cls, path: str | os.PathLike[str], backend: str | Backend = "auto") -> MLP:
        """Read a model written by :meth:`save`. Never unpickles; a malformed file raises
        :class:`~gpubp.errors.ModelFileError` saying what is wrong. A file written before models
        carried their preprocessing loads with a
        :class:`~gpubp.errors.NoPreprocessingWarning`."""
        return modelfile.load_model(cls, path, backend)

    # --- PyTorch ----------------------------------------------------------------------------

    def to_torch(self, device: Any = None) -> Any:
        """This model as ``torch.nn.Sequential(Linear, act, ..., Linear[, output act])`` with
        the same weights, in the model's dtype, on ``device`` (the CPU by default); a
        preprocessing is folded into the first ``Linear`` (see
        :func:`gpubp.interop.to_sequential`)."""
        weights, biases = self.get_parameters()
        return interop.to_sequential(
            weights, biases, self.activation, self.output, self._pre, device
        )

    @classmethod
    def from_torch(
        cls,
        seq: Any,
        loss: str | None = None,
        backend: str | Backend = "auto",
        dtype: str | None = None,
    ) -> MLP:
        """An MLP with the layers and weights of a ``torch.nn.Sequential`` of ``Linear`` and
        activation modules; ``loss`` defaults to ``cross_entropy`` after a softmax,
        ``binary_cross_entropy`` after a sigmoid, ``mse`` otherwise; ``dtype`` to the weights'
        (see :func:`gpubp.interop.read_sequential`). Nothing is built until all of ``seq`` has
        been read. A usual PyTorch classifier ends in ``Linear`` (its softmax inside
        ``CrossEntropyLoss``): ``from_torch(seq, loss="cross_entropy")`` gives it a softmax
        output (``binary_cross_entropy``: a sigmoid one)."""
        net = interop.read_sequential(seq, loss=loss, dtype=dtype)
        model = cls(
            net.layer_sizes,
            activation=net.activation,
            output=net.output,
            loss=net.loss,
            backend=backend,
            dtype=net.dtype,
        )
        model.set_parameters(*net.parameters(model.dtype.name))
        return model


def _print(line: str) -> None:
    print(line, flush=True)
