"""Arrays of other libraries in, PyTorch modules in and out.

**Arrays in.** Anything that speaks DLPack (``__dlpack__`` and ``__dlpack_device__``: PyTorch
tensors, JAX arrays, CuPy arrays, NumPy arrays) is read without a copy where it already lives on
the backend's device: on the CPU backends (``numpy``, ``numba``) a CPU tensor becomes a NumPy
view of the same memory (:func:`numpy.from_dlpack`); on the ``cupy`` backend a CUDA tensor
becomes a CuPy view (:func:`cupy.from_dlpack`). Where the devices differ the values are copied,
explicitly, through the producer's own DLPack export: a CUDA tensor on a CPU backend is copied to
the host, a CPU tensor on the ``cupy`` backend to the GPU (as a NumPy array would be). A tensor
that requires grad is read through ``detach()`` (gpubp only reads it).

**Modules out and in.** :func:`to_torch` gives a model as ``torch.nn.Sequential(Linear, act,
..., Linear[, output act])`` with the same weights; :func:`from_torch` reads such a module back
into an :class:`~gpubp.MLP`. PyTorch is optional: it is imported on first use only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .activations import LEAKY_SLOPE

if TYPE_CHECKING:
    from .backends import Backend
    from .model import MLP

__all__ = ["from_dlpack", "from_torch", "import_torch", "is_dlpack", "to_torch"]

# DLPack device types (dlpack.h): where the memory of an exported array lives
_CPU_DEVICES = (1, 3)  # kDLCPU, kDLCUDAHost (pinned host memory)
_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged


def import_torch() -> Any:
    """``torch``, or an ImportError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            "this needs PyTorch, which is not installed; pip install torch (see "
            "https://pytorch.org for the build that matches your GPU)"
        ) from None
    return torch


def is_dlpack(value: Any) -> bool:
    """Whether ``value`` exports DLPack (and is not a NumPy array, read as it is)."""
    return (
        not isinstance(value, np.ndarray)
        and hasattr(value, "__dlpack__")
        and hasattr(value, "__dlpack_device__")
    )


def from_dlpack(backend: Backend, value: Any, argument: str) -> Any:
    """``value`` (a DLPack exporter) as an array of ``backend``: a view of the same memory when
    it lives on the backend's device, else a copy onto it."""
    if getattr(value, "requires_grad", False) and callable(getattr(value, "detach", None)):
        value = value.detach()  # gpubp reads the values; the autograd graph stays untouched
    try:
        device_type = int(value.__dlpack_device__()[0])
        on_cpu = device_type in _CPU_DEVICES
        if backend.xp is np:  # the CPU backends
            return np.from_dlpack(value) if on_cpu else _host_copy(value)
        if device_type in _CUDA_DEVICES and hasattr(backend.xp, "from_dlpack"):
            return backend.xp.from_dlpack(value)  # the GPU backend, same device: no copy
        return backend.asarray(np.from_dlpack(value) if on_cpu else _host_copy(value))
    except (BufferError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise TypeError(
            f"{argument} ({type(value).__module__}.{type(value).__name__}) could not be read "
            f"through DLPack ({exc}); convert it to a NumPy array first"
        ) from None


def _host_copy(value: Any) -> np.ndarray:
    """A host copy of a device array, asked of the producer through DLPack (``dl_device``) or,
    for producers that predate it, its own ``cpu()`` (PyTorch) or ``get()`` (CuPy)."""
    try:
        return np.from_dlpack(value, device="cpu", copy=True)
    except (BufferError, TypeError, ValueError, RuntimeError, NotImplementedError):
        pass
    for method in ("cpu", "get"):
        fetch = getattr(value, method, None)
        if callable(fetch):
            host = fetch()
            return np.from_dlpack(host) if is_dlpack(host) else np.asarray(host)
    return np.asarray(value)


# --- nn.Sequential out and in ----------------------------------------------------------------


def _activation_module(nn: Any, name: str) -> Any:
    return {
        "identity": nn.Identity,
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
        "softmax": lambda: nn.Softmax(dim=1),
    }[name]()


def to_torch(model: MLP, device: Any = None) -> Any:
    """``model`` as ``torch.nn.Sequential``: ``Linear(n_0, n_1), act, ..., Linear(n_{L-1},
    n_L)`` and the output activation (none for ``identity``), in the model's dtype.

    ``Linear`` keeps ``weight`` ``(n_l, n_{l-1})`` and ``bias`` ``(n_l,)``, gpubp's own layout, so
    the weights are copied as they are. A model that carries input preprocessing
    ``x' = (x - shift) * scale`` has it folded into the first layer,
    ``W' = W diag(scale)`` and ``b' = b - W (scale * shift)`` (computed in float64), so the module
    takes the same raw inputs. The loss is not part of the module.
    """
    torch = import_torch()
    nn = torch.nn
    weights, biases = model.get_parameters()
    pre = model.preprocessing
    if pre is not None:
        W0 = weights[0].astype(np.float64)
        weights[0] = W0 * pre.scale[None, :]
        biases[0] = biases[0].astype(np.float64) - W0 @ (pre.scale * pre.shift)
    tdtype = torch.float32 if model.dtype == np.float32 else torch.float64
    layers: list[Any] = []
    for i, (W, b) in enumerate(zip(weights, biases)):
        linear = nn.Linear(W.shape[1], W.shape[0], dtype=tdtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(W)))
            linear.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
        layers.append(linear)
        if i < model.n_layers - 1:
            layers.append(_activation_module(nn, model.activation))
        elif model.output != "identity":
            layers.append(_activation_module(nn, model.output))
    seq = nn.Sequential(*layers)
    return seq if device is None else seq.to(device)


_READS = (
    "from_torch reads Linear, ReLU, Tanh, Sigmoid, LeakyReLU(0.01), Identity and Softmax(dim=1) "
    "(on the output only)"
)


def _activation_name(nn: Any, module: Any, where: str) -> str | None:
    """gpubp's name for an activation module, ``None`` for a Linear; refuses anything else."""
    if isinstance(module, nn.Linear):
        return None
    for cls, name in (
        (nn.Identity, "identity"),
        (nn.ReLU, "relu"),
        (nn.Tanh, "tanh"),
        (nn.Sigmoid, "sigmoid"),
    ):
        if type(module) is cls:
            return name
    if type(module) is nn.LeakyReLU:
        if module.negative_slope != LEAKY_SLOPE:
            raise ValueError(
                f"{where} is LeakyReLU(negative_slope={module.negative_slope}); gpubp's "
                f"leaky_relu has the slope {LEAKY_SLOPE}"
            )
        return "leaky_relu"
    if type(module) is nn.Softmax:
        if module.dim not in (1, -1):
            raise ValueError(
                f"{where} is Softmax(dim={module.dim}); gpubp's softmax runs over the features "
                "of each sample, dim=1"
            )
        return "softmax"
    raise ValueError(
        f"{where} is {type(module).__name__}, which gpubp has no equivalent of; {_READS}"
    )


def from_torch(
    seq: Any,
    loss: str | None = None,
    backend: Any = "auto",
    dtype: str | None = None,
) -> MLP:
    """An :class:`~gpubp.MLP` with the layers and weights of ``seq``, a ``torch.nn.Sequential``
    of ``Linear`` layers with an activation module after each (none: identity).

    The hidden layers must share one activation (gpubp has one hidden activation); the module
    after the last ``Linear`` is the output activation. ``loss`` is not part of a
    ``Sequential``: by default ``cross_entropy`` for a softmax output, ``binary_cross_entropy``
    for a sigmoid output, ``mse`` otherwise. ``dtype`` defaults to the weights' (float32 or
    float64). Anything else in ``seq`` (dropout, normalisation, a LogSoftmax) is refused with a
    ValueError naming it; nothing is built until all of ``seq`` has been read.
    """
    torch = import_torch()
    nn = torch.nn
    if not isinstance(seq, nn.Sequential):
        raise TypeError(
            f"seq must be a torch.nn.Sequential of Linear and activation modules, got "
            f"{type(seq).__name__}"
        )
    linears: list[Any] = []
    acts: list[str | None] = []  # the activation after each Linear (None: none given)
    for i, module in enumerate(seq):
        where = f"seq[{i}]"
        name = _activation_name(nn, module, where)
        if name is None:
            if linears and acts[-1] is None:
                acts[-1] = "identity"
            linears.append(module)
            acts.append(None)
            continue
        if not linears:
            raise ValueError(f"{where} is {type(module).__name__} before any Linear; {_READS}")
        if acts[-1] is not None:
            raise ValueError(
                f"{where} is a second activation after one Linear ({type(module).__name__}); "
                "gpubp applies one activation per layer"
            )
        acts[-1] = name
    if not linears:
        raise ValueError("seq holds no Linear layer; " + _READS)
    hidden = [a or "identity" for a in acts[:-1]]
    output = acts[-1] or "identity"
    if "softmax" in hidden:
        k = hidden.index("softmax")
        raise ValueError(
            f"the Softmax after Linear number {k + 1} is between layers; gpubp applies "
            "softmax on the output only"
        )
    if len(set(hidden)) > 1:
        raise ValueError(
            f"the hidden layers use different activations ({', '.join(hidden)}); a gpubp MLP "
            "has one hidden activation"
        )
    for k in range(1, len(linears)):
        if linears[k].in_features != linears[k - 1].out_features:
            raise ValueError(
                f"Linear number {k + 1} takes {linears[k].in_features} inputs but the one before "
                f"gives {linears[k - 1].out_features}"
            )
    dtypes = {str(lin.weight.dtype).removeprefix("torch.") for lin in linears}
    if dtype is None:
        if len(dtypes) != 1 or not dtypes <= {"float32", "float64"}:
            raise ValueError(
                f"the Linear weights are {', '.join(sorted(dtypes))}; pass dtype='float32' or "
                "'float64'"
            )
        dtype = dtypes.pop()
    if loss is None:
        loss = {"softmax": "cross_entropy", "sigmoid": "binary_cross_entropy"}.get(output, "mse")
    from .model import MLP

    sizes = [linears[0].in_features, *(lin.out_features for lin in linears)]
    model = MLP(
        sizes,
        activation=hidden[0] if hidden else "relu",
        output=output,
        loss=loss,
        backend=backend,
        dtype=dtype,
    )
    # in the model's dtype while still a tensor: NumPy has no bfloat16 (torch's .numpy() refuses)
    as_dtype = getattr(torch, np.dtype(dtype).name)

    def host(t: Any) -> np.ndarray:
        return np.asarray(t.detach().cpu().to(as_dtype).numpy())

    weights = [host(lin.weight) for lin in linears]
    biases = [np.zeros(lin.out_features) if lin.bias is None else host(lin.bias) for lin in linears]
    model.set_parameters(weights, biases)
    return model
