"""``gpubp bench --job``: the whole training job, side by side with PyTorch and scikit-learn.

One run trains the job ``gpubp train`` runs by default (``[n_in, 512, 256, 10]`` ReLU, Adam
lr 0.001 with a cosine schedule per step, batch 128 (32 on digits), 15 epochs, float32, the
seeded 10% validation hold-out left out of training) on each dataset asked for, with

- gpubp (``gpubp.train.train``, the backend ``auto`` picks);
- where PyTorch is installed, the usual PyTorch CPU loop with its default Adam, the same with
  ``Adam(fused=True)``, and the whole step through ``torch.compile`` (with a C++ compiler);
- where JAX is installed, the step in one ``jax.jit`` with a hand-written Adam;
- scikit-learn's ``MLPClassifier`` (Adam), where scikit-learn is installed;

each in a fresh process (:mod:`.job_worker`), interleaved: round ``r`` runs them in order,
round ``r + 1`` in reverse. It prints each one's training time (the median over the rounds),
its ratio to gpubp's and to the job's GEMM floor, its test accuracy and its threads.
``threads`` (``--threads``) is passed to each: gpubp's backend as ``threads=``, PyTorch's
``set_num_threads``, BLAS's limit (scikit-learn and the floor), JAX's CPU affinity. ``load``
(``--load N``) runs N busy processes (pure CPU spin loops) beside each contender and the floor,
started before and stopped after each.

The GEMM floor of a job: the same GEMMs as all its training steps, timed alone: the step floor
of :class:`~gpubp.bench.FloorCandidate` (forward ``a @ W.T`` per layer, ``delta @ W`` for every
layer but the first, ``delta.T @ a`` per layer, through the fastest GEMM found (the Numba
backend's provider, MKL where installed; NumPy's BLAS beside it) into preallocated outputs)
at the job's batch size and at its last, partial batch, times the number of each. The per-epoch
evaluations gpubp does for its history are in neither the floor nor gpubp's training time
(the JSON has them as ``epoch_seconds``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import numpy as np

from .. import __file__ as gpubp_file
from .. import __version__
from .. import datasets as data
from ..machine import blas, environment, threads_limited, version
from .candidates import FloorCandidate, provider_floor
from .job_worker import job_batch, job_config
from .problem import CPU, make_problem
from .timing import DEFAULT_MIN_TIME, DEFAULT_SETTLE, busy_processes, time_round_robin

#: The jobs ``--job all`` runs: the default job on Fashion-MNIST (where found) and on digits.
JOB_DATASETS = ("fashion-mnist", "digits")
#: Every contender of ``--job``, in the order of a round, and what it is.
CONTENDERS: dict[str, str] = {
    "gpubp": "gpubp train (the backend auto picks)",
    "torch": "PyTorch eager, default Adam",
    "torch-fused": "PyTorch eager, Adam(fused=True)",
    "torch-compile": "torch.compile of the whole step",
    "jax": "JAX jit, hand-written Adam",
    "sklearn": "scikit-learn's MLPClassifier",
}
#: A contender whose test accuracy is this far below gpubp's is flagged: not the same result.
ACCURACY_GAP = 0.02
#: Width of the contender column of the tables.
LABEL_WIDTH = 52
#: Samples of each step floor (the median is used).
FLOOR_REPEATS = 7


@dataclass
class JobSpec:
    """One job: ``gpubp train --dataset D --epochs E`` (``--data-dir`` where given)."""

    dataset: str
    epochs: int
    data_dir: str | None = None
    threads: int | None = None  # --threads, passed to every contender

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobRow:
    """One contender on one job: every round's training time and the median's ratios."""

    contender: str
    label: str = ""
    seconds: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    threads: int | None = None  # what the contender ran with (its own report)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return float(np.median(self.seconds)) if self.seconds else None


@dataclass
class JobResult:
    """One job's shapes, floor and rows."""

    spec: JobSpec
    sizes: list[int]
    batch: int
    n_train: int
    steps: int
    floor_seconds: float
    floor_step: dict[int, float]
    rows: list[JobRow]
    floor_threads: int | None = None  # BLAS's threads while the floor was timed
    #: the floor's GEMM ("mkl", "openblas": the provider; "NumPy BLAS"), and NumPy's beside it
    floor_name: str = "NumPy BLAS"
    numpy_floor_seconds: float | None = None


def job_shape(spec: JobSpec) -> tuple[list[int], int, int]:
    """``(layer sizes, batch size, training samples)`` of the job, from its data."""
    config = job_config(spec.to_json())
    ds = data.load_dataset(config.dataset, config.data_dir, False, config.seed, progress=False)
    n_val = round(len(ds.x_train) * config.val_fraction)
    n_train = len(ds.x_train) - n_val
    sizes = [ds.n_features, *config.layers, ds.n_classes]
    return sizes, job_batch(config, n_train), n_train


def gemm_floor(
    sizes: list[int], batch: int, n_train: int, epochs: int, provider: bool = True
) -> tuple[float, dict[int, float]]:
    """Seconds the job's training GEMMs take alone, and the step floor at each batch size used,
    through the GEMM provider (``provider``; MKL where installed) or NumPy's BLAS.

    ``epochs * (full * t(batch) + t(rest))`` with ``full, rest = divmod(n_train, batch)``.
    """
    full, rest = divmod(n_train, batch)
    per_step: dict[int, float] = {}
    for b in sorted({batch, rest} - {0}):
        fast = provider_floor() if provider else None
        floor: FloorCandidate = FloorCandidate(np, CPU) if fast is None else fast
        floor.setup(make_problem(sizes, b, "float32", with_reference=False))
        stats = time_round_robin([floor], FLOOR_REPEATS, DEFAULT_MIN_TIME, settle=DEFAULT_SETTLE)
        per_step[b] = stats[floor.label].median
    total = full * per_step[batch] + (per_step[rest] if rest else 0.0)
    return epochs * total, per_step


def run_contender(contender: str, spec: JobSpec, timeout: float | None = None) -> dict[str, Any]:
    """One contender trained on ``spec`` in a fresh process: its JSON answer, or ``error``."""
    cmd = [sys.executable, "-m", "gpubp.bench.job_worker", contender, json.dumps(spec.to_json())]
    # the child imports the same gpubp as this process, wherever that came from
    root = os.path.dirname(os.path.dirname(os.path.abspath(gpubp_file)))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:g} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit status {proc.returncode}: {tail}"}
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer


def contender_status(name: str) -> str | None:
    """``None`` if the contender ``name`` can run here, else why not (with what to install)."""
    if name.startswith("torch"):
        if importlib.util.find_spec("torch") is None:
            return "PyTorch is not installed (pip install torch)"
        major_minor = tuple(int(p) for p in version("torch").split(".")[:2] if p.isdigit())
        if name == "torch-fused" and major_minor < (2, 4):
            return "Adam(fused=True) on the CPU needs PyTorch 2.4 or later"
        compilers = (os.environ.get("CXX", "g++"), "g++", "clang++")
        if name == "torch-compile" and not any(shutil.which(c) for c in compilers):
            return "torch.compile on the CPU needs a C++ compiler (g++ or clang++, or $CXX)"
    if name == "jax" and importlib.util.find_spec("jax") is None:
        return "JAX is not installed (pip install jax)"
    if name == "sklearn" and importlib.util.find_spec("sklearn") is None:
        return "scikit-learn is not installed"
    return None


def available_contenders(
    wanted: Sequence[str] | None = None, torch: bool = True, sklearn: bool = True
) -> tuple[list[str], list[str]]:
    """``(contenders, absent)``: those of ``wanted`` (default: all) that can run here, and why
    the others cannot; ``torch=False`` / ``sklearn=False``: left out (``--no-torch``, ...)."""
    names, absent = [], []
    for name in CONTENDERS:
        if wanted is not None and name not in wanted:
            continue
        left_out = (not torch and name.startswith("torch")) or (not sklearn and name == "sklearn")
        why = f"left out by --no-{name.split('-')[0]}" if left_out else contender_status(name)
        if why is None:
            names.append(name)
        else:
            absent.append(f"{name} ({CONTENDERS[name]}): {why}")
    return names, absent


def run_job(
    spec: JobSpec,
    contenders: list[str],
    rounds: int,
    progress: TextIO | None = None,
    load: int = 0,
) -> JobResult:
    """``rounds`` interleaved rounds of the floor and every contender on ``spec``, each beside
    ``load`` busy processes; the floor of the result is the median round's (the lower middle
    one for an even count)."""

    def say(text: str) -> None:
        if progress is not None:
            progress.write(f"gpubp bench --job {spec.dataset}: {text}\n")
            progress.flush()

    sizes, batch, n_train = job_shape(spec)
    rows = {c: JobRow(c) for c in contenders}
    floors: list[tuple[float, dict[int, float]]] = []
    numpy_floors: list[float] = []
    floor_threads: int | None = None
    for r in range(rounds):
        # the floor once a round, beside the contenders: drift on a busy machine hits it too
        say(f"round {r + 1}/{rounds}: the GEMM floor of {sizes} at batch {batch}")
        with busy_processes(load), threads_limited(spec.threads):
            floors.append(gemm_floor(sizes, batch, n_train, spec.epochs))
            numpy_floors.append(gemm_floor(sizes, batch, n_train, spec.epochs, False)[0])
            floor_threads = blas()["threads"]
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            row = rows[c]
            if row.error is not None:
                continue
            say(f"round {r + 1}/{rounds}: {c}")
            with busy_processes(load):
                answer = run_contender(c, spec)
            if "error" in answer:
                row.error = answer["error"]
                say(f"round {r + 1}/{rounds}: {c} failed: {row.error}")
                continue
            say(
                f"round {r + 1}/{rounds}: {c}: {answer['train_seconds']:.2f} s, test accuracy "
                f"{answer['test_accuracy']:.4f}"
            )
            row.label = answer["label"]
            row.threads = answer.get("threads")
            row.seconds.append(float(answer["train_seconds"]))
            row.accuracy.append(float(answer["test_accuracy"]))
            if "epoch_seconds" in answer:
                row.epoch_seconds.append(float(answer["epoch_seconds"]))
    steps = spec.epochs * math.ceil(n_train / batch)
    floor_seconds, floor_step = sorted(floors, key=lambda f: f[0])[(len(floors) - 1) // 2]
    rows_out = list(rows.values())
    pf = provider_floor()
    return JobResult(
        spec,
        sizes,
        batch,
        n_train,
        steps,
        floor_seconds,
        floor_step,
        rows_out,
        floor_threads,
        floor_name="NumPy BLAS" if pf is None else pf.provider,
        numpy_floor_seconds=sorted(numpy_floors)[(len(numpy_floors) - 1) // 2],
    )


# --- report -----------------------------------------------------------------------------------


def format_job(result: JobResult) -> str:
    """One job's table: training time, x gpubp, x floor, test accuracy; the contenders whose
    accuracy is :data:`ACCURACY_GAP` or more below gpubp's are named under it."""
    spec = result.spec
    gpubp = next((r for r in result.rows if r.contender == "gpubp" and r.seconds), None)
    head = (
        f"{spec.dataset}: {result.sizes} ReLU, Adam lr 0.001 cosine, batch {result.batch}, "
        f"{spec.epochs} epoch(s) = {result.steps} steps on {result.n_train} samples, float32"
    )
    w = LABEL_WIDTH
    lines = [
        head,
        f"{'contender':{w}} {'train s':>9} {'x gpubp':>8} {'x floor':>8} {'test acc':>9}",
    ]
    notes = []
    for row in result.rows:
        if row.error is not None:
            lines.append(f"{row.label or row.contender:{w}} failed: {row.error}")
            continue
        med = row.median
        assert med is not None
        x_gpubp = f"{med / gpubp.median:8.2f}" if gpubp is not None and gpubp.median else "-"
        acc = float(np.median(row.accuracy))
        lines.append(
            f"{row.label:{w}} {med:9.2f} {x_gpubp:>8} {med / result.floor_seconds:8.2f} {acc:9.4f}"
        )
        if gpubp is not None and acc <= float(np.median(gpubp.accuracy)) - ACCURACY_GAP:
            notes.append(f"note: {row.label} reaches a lower test accuracy than gpubp")
    floor_x = f"{result.floor_seconds / gpubp.median:8.2f}" if gpubp and gpubp.median else "-"
    threads = "" if result.floor_threads is None else f", {result.floor_threads} threads"
    floor = f"floor: the same GEMMs alone ({result.floor_name})"
    lines.append(f"{floor:{w}} {result.floor_seconds:9.2f} {floor_x:>8} {1.0:8.2f} {'-':>9}")
    np_floor = result.numpy_floor_seconds
    if np_floor is not None and result.floor_name != "NumPy BLAS":
        x_np = f"{np_floor / gpubp.median:8.2f}" if gpubp and gpubp.median else "-"
        label = f"  the same GEMMs in NumPy BLAS{threads}"
        x_f = np_floor / result.floor_seconds
        lines.append(f"{label:{w}} {np_floor:9.2f} {x_np:>8} {x_f:8.2f} {'-':>9}")
    return "\n".join(lines + notes)


def format_report(
    results: list[JobResult],
    absent: list[str],
    command: str,
    rounds: int,
    load: int = 0,
    threads: int | None = None,
) -> str:
    """Every job's table, what the columns mean, the load and threads, and what is absent."""
    env = environment(torch=False)
    lines = [
        f"gpubp bench --job: the whole training job, {rounds} interleaved round(s), each "
        f"contender in a fresh process | {env['cpu']}, {env['cores']} cores "
        f"({env['usable_cores']} usable), Python {env['python']}, NumPy {env['numpy']} "
        f"({env['blas']}), {env['date']}",
        f"load: {load} busy process(es) beside each contender and the floor | threads: "
        + ("each contender's default" if threads is None else f"{threads} for every contender"),
        "",
    ]
    for result in results:
        lines += [format_job(result), ""]
    lines += [
        "train s = the training steps of all epochs (median over rounds; data loading, imports "
        "and warm-up excluded; gpubp's per-epoch history evaluations excluded); x gpubp and "
        "x floor = train s / gpubp's and / the floor's; floor = the step's GEMMs alone at the "
        "job's batch sizes, times its steps; test acc on the dataset's test set",
        f"command: {command}",
    ]
    if absent:
        lines += ["", "absent here:"] + [f"  - {a}" for a in absent]
    return "\n".join(lines)


def to_json(
    results: list[JobResult],
    absent: list[str],
    command: str,
    load: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """The report as JSON: ``meta`` (machine, command, ``load``, ``threads``), ``jobs`` (each
    with its floor and rows: contender, label, seconds, accuracy, threads) and ``absent``."""
    return {
        "meta": {
            **environment(torch=False),
            "gpubp": __version__,
            "command": command,
            "load": load,
            "threads": threads,
        },
        "jobs": [
            {
                "spec": r.spec.to_json(),
                "sizes": r.sizes,
                "batch": r.batch,
                "n_train": r.n_train,
                "steps": r.steps,
                "floor_seconds": r.floor_seconds,
                "floor_step_seconds": {str(b): s for b, s in r.floor_step.items()},
                "floor_threads": r.floor_threads,
                "floor_gemm": r.floor_name,
                "numpy_floor_seconds": r.numpy_floor_seconds,
                "rows": [asdict(row) for row in r.rows],
            }
            for r in results
        ],
        "absent": absent,
    }
