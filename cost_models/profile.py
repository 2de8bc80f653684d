"""Measured device and link numbers: what the cost model uses instead of datasheet ones.

``hetcompile profile -o profile.json`` runs :func:`measure_profile` on this
machine and writes a :class:`DeviceProfile`; a cluster spec names the file for
a device type (``"devices": {"CPU": {"profile": "profile.json"}}``) and then
:mod:`cost_models.roofline`, :mod:`cost_models.comm` and the optimizer term of
:mod:`hetcompile.predict` use the measured numbers.

What is measured, and the model each number feeds (timed with
``torch.utils.benchmark``, medians; the links by hand, trimmed means):

- matmul time over shapes and dtypes, fitted as ``t = overhead + flops / rate``
  per dtype: ``matmul_flops_per_s[dtype]`` (the slope; small shapes are slow
  because of the fixed part, which the per-op overhead below accounts for);
- the time of a mix of elementwise ops (tanh, scale, add, pow, copy) over sizes,
  fitted as ``t = overhead + bytes / bw``: ``mem_bw_bytes_per_s``;
- the per-op cost of an ATen call as the emitted stage programs make it
  (``torch.ops.aten.X.default``, autograd recording on), forward and backward:
  ``op_fwd_overhead_s``, ``op_bwd_overhead_s``;
- an Adam step per parameter tensor (the per-tensor loop of torch's CPU
  optimizers): ``optimizer_per_tensor_s``;
- with ``models``, the model file's own optimizer (its step on the model's
  parameters and on small tensors: per step, per tensor and per byte): ``optimizer_times``,
  keyed by its class and settings (:mod:`hetcompile.block_profile`);
- with ``models``, the model's own blocks (forward, and backward, of each
  distinct layer at samples per call from 1 up to the model's batch, fitted as
  ``t = fixed + per_sample * samples``): ``block_times``, keyed by the block's
  signature (:mod:`hetcompile.block_profile`); the cost model prices those
  blocks by their measured points (NOTE: [measured curve]);
- with ``num_ranks >= 2`` local processes (gloo on CPU, NCCL on CUDA):
  one-way point-to-point and all-reduce over message sizes, each fitted as
  ``t = latency + bytes / bw`` (all-reduce as ring-equivalent link numbers,
  so :func:`cost_models.comm.ring_allreduce_time_s` reproduces the measured
  time for ``num_ranks`` ranks); all-reduces once more after a backward's worth
  of compute (NOTE: [all-reduces after a backward]); and, on a CPU, a transfer
  while every core computes (NOTE: [transfers on full cores]).

The file is versioned JSON (:meth:`DeviceProfile.to_json`); raw samples are
kept beside the fitted numbers so a reader can check the fit.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import json
import logging
import os
import platform
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetcompile.errors import UserError

logger = logging.getLogger(__name__)

PROFILE_VERSION = 1
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The cost model interpolates the rate by FLOPs per call (blocks do not record shapes), so
# up to ~0.5 GFLOP the shapes are those of small models' layers: tokens x hidden with an inner
# dimension of 64 to 256, which run at a fraction of a square matmul's rate on a CPU. Only
# the largest is square (large layers are throughput-bound).
MATMUL_SHAPES = ((16, 64, 64), (64, 64, 64), (128, 192, 64), (256, 256, 64), (256, 512, 64), (512, 384, 128),
                 (1024, 512, 128), (1024, 1024, 256), (1024, 1024, 1024))
MATMUL_SHAPES_CUDA = MATMUL_SHAPES + ((2048, 2048, 2048), (4096, 4096, 4096), (8192, 8192, 8192))
COPY_NUMEL = (1 << 12, 1 << 16, 1 << 20, 1 << 22)
COMM_BYTES = (4, 1 << 12, 1 << 16, 1 << 20, 1 << 22)
# Compute on every rank before each measured transfer (NOTE: [collectives as a step meets them]).
COMM_GAP_S = 0.002
# ... and before each all-reduce timed as a gradient all-reduce (NOTE: [all-reduces after a backward]),
# of these sizes: the smaller one takes the latency, give or take.
GRAD_GAP_S = 0.02
GRAD_BYTES = (1 << 16, 1 << 22)
# Ops per timed chain when measuring per-op overhead: long enough that the
# Python loop and the final sum are a small part of the time.
_CHAIN_LEN = 40


@dataclass(frozen=True)
class CommProfile:
    """Measured links between ``num_ranks`` local ranks (one machine, so one "node")."""

    num_ranks: int
    backend: str
    p2p_latency_s: float
    p2p_bw_bytes_per_s: float
    # Ring-equivalent link numbers: ring_allreduce_time_s(bytes, num_ranks, bw, latency)
    # gives the measured all-reduce time.
    allreduce_latency_s: float
    allreduce_bw_bytes_per_s: float
    samples: tuple[tuple[str, int, float], ...] = ()  # (kind, bytes, seconds)
    # Mean seconds a rank's main thread spends posting one send or receive while the ranks
    # compute (NOTE: [posting a transfer]); 0 in profiles written before it was measured.
    p2p_post_s: float = 0.0
    # CPU: mean one-way seconds of a small transfer posted while every core computes, the sender
    # keeping its core (NOTE: [transfers on full cores]); 0 where not measured.
    p2p_full_cores_latency_s: float = 0.0
    # Ring-equivalent link numbers of an all-reduce that ends a long stretch of compute, as a
    # stage's gradient all-reduce ends its backward (NOTE: [all-reduces after a backward]); 0
    # where not measured (the numbers above then stand for it).
    grad_allreduce_latency_s: float = 0.0
    grad_allreduce_bw_bytes_per_s: float = 0.0


@dataclass(frozen=True)
class BlockTime:
    """Measured time of one call of a model's block on this device (:mod:`hetcompile.block_profile`).

    Keyed by the block's signature (a hash of its ops, shapes and dtypes), so identical
    layers, of this model or another, share one measurement. Fitted as
    ``fixed + per_sample * samples`` over the measured ``samples`` per call; the cost model
    reads the measured points themselves where it can (:meth:`segment`).
    """

    signature: str
    name: str  # "model.py:transformer.h.0": the block it was measured as, for a reader
    fwd_fixed_s: float
    fwd_per_sample_s: float
    bwd_fixed_s: float
    bwd_per_sample_s: float
    samples: tuple[tuple[int, float, float], ...] = ()  # (samples per call, forward s, backward s)

    def call_time_s(self, samples: int) -> tuple[float, float]:
        """(forward, backward) seconds of one call on ``samples`` samples (:meth:`segment`)."""
        (fwd_fixed, fwd_slope), (bwd_fixed, bwd_slope) = self.segment(samples)
        return fwd_fixed + fwd_slope * samples, bwd_fixed + bwd_slope * samples

    def segment(self, samples: int | None) -> tuple[tuple[float, float], tuple[float, float]]:
        """(fixed, per-sample) of the forward and of the backward around ``samples`` samples a call
        (None: the fitted line, for a cost per sample whatever the size).

        NOTE: [measured curve] A block's time is not one line over all sizes: the MLP example
        at width 512 summed 0.12-0.18 ms forward over 1-16 samples a call and 0.45 and 0.77 ms at
        64 and 128, so the line fitted over 1-16 put 96 samples at 0.33 ms, against about 0.6
        measured (2026-11-25). So between two measured sizes the time is the straight line
        between them, and outside them the line through the two nearest. The per-sample part is
        that line's slope (at least 0: a smaller share never costs more), which is what tensor
        parallelism scales; the fixed part makes the sum the line's value at ``samples``.
        Without measured points (or with one), the fitted line.
        """
        points = sorted(self.samples)
        if samples is None or len(points) < 2:
            return (self.fwd_fixed_s, self.fwd_per_sample_s), (self.bwd_fixed_s, self.bwd_per_sample_s)
        sizes = [p[0] for p in points]
        hi = min(max(bisect.bisect_left(sizes, samples), 1), len(points) - 1)
        (n0, *t0), (n1, *t1) = points[hi - 1], points[hi]
        out = []
        for a, b in zip(t0, t1):
            at = a + (b - a) * (samples - n0) / (n1 - n0)
            slope = max((b - a) / (n1 - n0), 0.0)
            out.append((max(at, 0.0) - slope * samples, slope))
        return out[0], out[1]


@dataclass(frozen=True)
class OptimizerTime:
    """Measured step of a model file's own optimizer on this device
    (:func:`hetcompile.block_profile.measure_model_optimizer`): ``fixed_s`` per step, plus
    ``per_tensor_s`` per parameter tensor (the per-tensor loop), plus ``per_byte_s`` per
    parameter byte.

    Keyed by :func:`hetcompile.block_profile.optimizer_signature` (its class and which of its
    settings are on), so SGD with momentum is not priced as AdamW.
    """

    signature: str
    name: str  # "mlp.py: SGD", for a reader
    per_tensor_s: float
    per_byte_s: float
    fixed_s: float = 0.0

    def step_time_s(self, num_tensors: int, param_bytes: float, *, whole_step: bool = True) -> float:
        """Seconds of a step over these parameters; ``whole_step=False``: without the per-step part
        (parameters that share a step with others: another stage of the same rank)."""
        return self.fixed_s * whole_step + num_tensors * self.per_tensor_s + param_bytes * self.per_byte_s


@dataclass(frozen=True)
class DeviceProfile:
    """Measured numbers of one device type (see the module docstring for each).

    >>> p = DeviceProfile(device="cpu", device_name="test", num_threads=1,
    ...                   matmul_flops_per_s=(("fp32", 2e10),), mem_bw_bytes_per_s=1e10,
    ...                   op_fwd_overhead_s=5e-6, op_bwd_overhead_s=1e-5, optimizer_per_tensor_s=5e-5)
    >>> DeviceProfile.from_json(p.to_json()) == p
    True
    >>> p.flops_per_s("bf16")  # an unmeasured dtype falls back to fp32
    20000000000.0
    """

    device: str  # "cpu" or "cuda"
    device_name: str
    num_threads: int  # torch intra-op threads per rank during the measurement
    matmul_flops_per_s: tuple[tuple[str, float], ...]  # (dtype, fitted rate)
    mem_bw_bytes_per_s: float
    op_fwd_overhead_s: float
    op_bwd_overhead_s: float
    optimizer_per_tensor_s: float
    comm: CommProfile | None = None
    torch_version: str = ""
    created: str = ""
    # (dtype, m, n, k, seconds): the cost model interpolates the rate of a call of a given size.
    matmul_samples: tuple[tuple[str, int, int, int, float], ...] = ()
    # The model's own blocks, measured (`hetcompile profile --model M.py`); the cost model
    # prices a block it finds here by its measured time instead of the kernel-level model.
    block_times: tuple[BlockTime, ...] = ()
    # Measured with the blocks: one stage call (a graph module's forward) and one
    # autograd.backward call apart from their ops; a rank pays them per micro-batch.
    stage_call_fwd_s: float = 0.0
    stage_call_bwd_s: float = 0.0
    # CPU: the cores the measuring process could run on (0: not recorded). One device is one rank
    # of num_threads threads; a node of more devices than cores / num_threads shares its cores.
    num_cores: int = 0
    # The models' own optimizers, measured (`hetcompile profile --model M.py`); without one, the
    # optimizer is priced as AdamW (optimizer_per_tensor_s and the memory traffic).
    optimizer_times: tuple[OptimizerTime, ...] = ()

    def block_time(self, signature: str) -> BlockTime | None:
        """The measured block of this signature, or None."""
        if not signature:
            return None
        return next((t for t in self.block_times if t.signature == signature), None)

    def optimizer_time(self, signature: str) -> OptimizerTime | None:
        """The measured optimizer of this signature, or None."""
        if not signature:
            return None
        return next((t for t in self.optimizer_times if t.signature == signature), None)

    def flops_per_s(self, dtype: str) -> float:
        rates = dict(self.matmul_flops_per_s)
        if dtype in rates:
            return rates[dtype]
        for other in ("bf16", "fp16", "fp32"):
            if other in rates and (dtype != "fp32" or other == "fp32"):
                return rates[other]
        return next(iter(rates.values()))

    def matmul_rate(self, dtype: str, flops_per_call: float) -> float:
        """The measured rate of a matmul of ``flops_per_call`` FLOPs: interpolated (log-log) between
        the measured shapes of ``dtype``, clamped to the end ones; the fitted rate without samples.

        Small matmuls run far below the fitted rate (packing, short inner loops), and the
        layers of small models are made of them.

        >>> p = DeviceProfile("cpu", "t", 1, (("fp32", 4e10),), 1e10, 0.0, 0.0, 0.0,
        ...                   matmul_samples=(("fp32", 10, 10, 10, 2e-6), ("fp32", 100, 100, 100, 1e-4)))
        >>> p.matmul_rate("fp32", 2e3), p.matmul_rate("fp32", 2e9)
        (1000000000.0, 20000000000.0)
        >>> round(p.matmul_rate("fp32", (2e3 * 2e6) ** 0.5) / 1e9, 6)  # halfway in log: the geometric mean
        4.472136
        """
        import math

        points = sorted((2.0 * m * n * k, 2.0 * m * n * k / t) for d, m, n, k, t in self.matmul_samples
                        if d == dtype and t > 0)
        if not points:
            return self.flops_per_s(dtype)
        if flops_per_call <= points[0][0]:
            return points[0][1]
        for (f0, r0), (f1, r1) in zip(points, points[1:]):
            if flops_per_call <= f1:
                w = (math.log(flops_per_call) - math.log(f0)) / (math.log(f1) - math.log(f0)) if f1 > f0 else 1.0
                return math.exp((1 - w) * math.log(r0) + w * math.log(r1))
        return points[-1][1]

    def to_json(self) -> dict:
        out = {
            "version": PROFILE_VERSION,
            "device": self.device, "device_name": self.device_name, "num_threads": self.num_threads,
            "torch_version": self.torch_version, "created": self.created,
            "matmul_flops_per_s": dict(self.matmul_flops_per_s),
            "mem_bw_bytes_per_s": self.mem_bw_bytes_per_s,
            "op_fwd_overhead_s": self.op_fwd_overhead_s, "op_bwd_overhead_s": self.op_bwd_overhead_s,
            "optimizer_per_tensor_s": self.optimizer_per_tensor_s,
            "comm": None,
            "matmul_samples": [{"dtype": d, "m": m, "n": n, "k": k, "time_s": t}
                               for d, m, n, k, t in self.matmul_samples],
            "stage_call_fwd_s": self.stage_call_fwd_s, "stage_call_bwd_s": self.stage_call_bwd_s,
            "num_cores": self.num_cores,
            "blocks": [{"signature": b.signature, "name": b.name, "fwd_fixed_s": b.fwd_fixed_s,
                        "fwd_per_sample_s": b.fwd_per_sample_s, "bwd_fixed_s": b.bwd_fixed_s,
                        "bwd_per_sample_s": b.bwd_per_sample_s,
                        "samples": [{"samples": n, "fwd_s": f, "bwd_s": bw} for n, f, bw in b.samples]}
                       for b in self.block_times],
            "optimizers": [{"signature": o.signature, "name": o.name, "fixed_s": o.fixed_s,
                            "per_tensor_s": o.per_tensor_s, "per_byte_s": o.per_byte_s}
                           for o in self.optimizer_times],
        }
        if self.comm is not None:
            c = self.comm
            out["comm"] = {"num_ranks": c.num_ranks, "backend": c.backend,
                           "p2p_latency_s": c.p2p_latency_s, "p2p_bw_bytes_per_s": c.p2p_bw_bytes_per_s,
                           "allreduce_latency_s": c.allreduce_latency_s,
                           "allreduce_bw_bytes_per_s": c.allreduce_bw_bytes_per_s,
                           "p2p_post_s": c.p2p_post_s, "p2p_full_cores_latency_s": c.p2p_full_cores_latency_s,
                           "grad_allreduce_latency_s": c.grad_allreduce_latency_s,
                           "grad_allreduce_bw_bytes_per_s": c.grad_allreduce_bw_bytes_per_s,
                           "samples": [{"kind": k, "bytes": b, "time_s": t} for k, b, t in c.samples]}
        return out

    @classmethod
    def from_json(cls, d: Any, where: str = "the profile") -> "DeviceProfile":
        if not isinstance(d, dict) or d.get("version") != PROFILE_VERSION:
            found = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise UserError(f"{where} is not a hetcompile profile of version {PROFILE_VERSION} (found {found!r}). "
                            "Write a new one with `hetcompile profile -o profile.json`.")
        try:
            comm = None
            if d.get("comm"):
                c = d["comm"]
                comm = CommProfile(
                    num_ranks=int(c["num_ranks"]), backend=str(c["backend"]),
                    p2p_latency_s=_non_negative(c["p2p_latency_s"]),
                    p2p_bw_bytes_per_s=_positive(c["p2p_bw_bytes_per_s"]),
                    allreduce_latency_s=_non_negative(c["allreduce_latency_s"]),
                    allreduce_bw_bytes_per_s=_positive(c["allreduce_bw_bytes_per_s"]),
                    p2p_post_s=_non_negative(c.get("p2p_post_s", 0.0)),
                    p2p_full_cores_latency_s=_non_negative(c.get("p2p_full_cores_latency_s", 0.0)),
                    grad_allreduce_latency_s=_non_negative(c.get("grad_allreduce_latency_s", 0.0)),
                    grad_allreduce_bw_bytes_per_s=_non_negative(c.get("grad_allreduce_bw_bytes_per_s", 0.0)),
                    samples=tuple((s["kind"], int(s["bytes"]), float(s["time_s"])) for s in c.get("samples", ())))
            rates = tuple((k, _positive(v)) for k, v in sorted(d["matmul_flops_per_s"].items()))
            if not rates:
                raise ValueError("no matmul rates")
            return cls(
                device=str(d["device"]), device_name=str(d["device_name"]), num_threads=int(d["num_threads"]),
                matmul_flops_per_s=rates, mem_bw_bytes_per_s=_positive(d["mem_bw_bytes_per_s"]),
                op_fwd_overhead_s=_non_negative(d["op_fwd_overhead_s"]),
                op_bwd_overhead_s=_non_negative(d["op_bwd_overhead_s"]),
                optimizer_per_tensor_s=_non_negative(d["optimizer_per_tensor_s"]), comm=comm,
                torch_version=str(d.get("torch_version", "")), created=str(d.get("created", "")),
                matmul_samples=tuple((s["dtype"], int(s["m"]), int(s["n"]), int(s["k"]), float(s["time_s"]))
                                     for s in d.get("matmul_samples", ())),
                stage_call_fwd_s=_non_negative(d.get("stage_call_fwd_s", 0.0)),
                stage_call_bwd_s=_non_negative(d.get("stage_call_bwd_s", 0.0)),
                num_cores=int(d.get("num_cores", 0)),
                block_times=tuple(
                    BlockTime(signature=str(b["signature"]), name=str(b.get("name", "")),
                              fwd_fixed_s=_non_negative(b["fwd_fixed_s"]),
                              fwd_per_sample_s=_non_negative(b["fwd_per_sample_s"]),
                              bwd_fixed_s=_non_negative(b["bwd_fixed_s"]),
                              bwd_per_sample_s=_non_negative(b["bwd_per_sample_s"]),
                              samples=tuple((int(x["samples"]), float(x["fwd_s"]), float(x["bwd_s"]))
                                            for x in b.get("samples", ())))
                    for b in d.get("blocks", ())),
                optimizer_times=tuple(
                    OptimizerTime(signature=str(o["signature"]), name=str(o.get("name", "")),
                                  per_tensor_s=_non_negative(o["per_tensor_s"]),
                                  per_byte_s=_non_negative(o["per_byte_s"]),
                                  fixed_s=_non_negative(o.get("fixed_s", 0.0)))
                    for o in d.get("optimizers", ())))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where} is malformed ({type(e).__name__}: {e}). Write a new one with "
                            "`hetcompile profile -o profile.json`.") from None


def _positive(x) -> float:
    x = float(x)
    if not x > 0:
        raise ValueError(f"expected a positive number, got {x}")
    return x


def _non_negative(x) -> float:
    x = float(x)
    if not x >= 0:
        raise ValueError(f"expected a number >= 0, got {x}")
    return x


def load_profile(path: str | os.PathLike) -> DeviceProfile:
    """Read a profile file written by :func:`save_profile` (``hetcompile profile``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"Profile file {path!r} does not exist. Write it with `hetcompile profile -o {path}`, "
                        "or fix the path (relative paths are relative to the cluster spec's folder).")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"Profile file {path!r} is not valid JSON ({e.msg} at line {e.lineno}). "
                        "Write a new one with `hetcompile profile`.") from None
    return DeviceProfile.from_json(data, where=f"profile file {path!r}")


def save_profile(profile: DeviceProfile, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(profile.to_json(), indent=1, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- fitting


def fit_overhead_and_rate(sizes, times_s) -> tuple[float, float]:
    """Fit ``t = overhead + size / rate`` by least squares on relative error; (overhead_s, rate).

    Relative error so that the small sizes (microseconds) count as much as the large ones.

    >>> o, r = fit_overhead_and_rate([1e3, 1e6, 1e9], [1e-6 + 1e3 / 1e9, 1e-6 + 1e-3, 1e-6 + 1.0])
    >>> round(o * 1e6, 6), round(r / 1e9, 6)
    (1.0, 1.0)
    """
    import numpy as np

    x = np.asarray(sizes, dtype=float)
    t = np.asarray(times_s, dtype=float)
    a = np.stack([np.ones_like(x), x], axis=1) / t[:, None]
    (overhead, inv_rate), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    if inv_rate <= 0:  # flat curve: no measurable size dependence, so take the largest-size rate
        inv_rate = t[-1] / x[-1]
        overhead = 0.0
    return max(float(overhead), 0.0), float(1.0 / inv_rate)


# ---------------------------------------------------------------- measuring one device


def _median_s(stmt: str, globals_: dict, min_run_time_s: float, sync=None) -> float:
    from torch.utils.benchmark import Timer

    if sync is not None:
        stmt = f"{stmt}; {sync}"
    return Timer(stmt, globals=globals_).blocked_autorange(min_run_time=min_run_time_s).median


@contextlib.contextmanager
def torch_threads(num_threads: int):
    """Run the block with ``num_threads`` torch intra-op threads, then restore the count."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _device(device: str):
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("`hetcompile profile --device cuda` needs a CUDA (or ROCm) GPU, and torch sees none. "
                            "Run it on the GPU machine, or use --device cpu.")
        return torch.device("cuda"), "torch.cuda.synchronize()", torch.cuda.get_device_name()
    if device != "cpu":
        raise UserError(f"Unknown --device {device!r}; use cpu or cuda.")
    return torch.device("cpu"), None, platform.processor() or platform.machine()


def measure_matmul(device: str = "cpu", dtypes=("fp32", "bf16"), shapes=None, min_run_time_s: float = 0.05):
    """Matmul samples ``(dtype, m, n, k, seconds)`` and the fitted rate per dtype."""
    import torch

    dev, sync, _ = _device(device)
    shapes = shapes or (MATMUL_SHAPES_CUDA if device == "cuda" else MATMUL_SHAPES)
    samples, rates = [], []
    for dtype in dtypes:
        torch_dtype = getattr(torch, _DTYPES[dtype])
        flops, times = [], []
        for m, n, k in shapes:
            a = torch.randn(m, k, device=dev).to(torch_dtype)
            b = torch.randn(k, n, device=dev).to(torch_dtype)
            t = _median_s("aten.mm.default(a, b)", {"aten": torch.ops.aten, "a": a, "b": b}, min_run_time_s, sync)
            samples.append((dtype, m, n, k, t))
            flops.append(2.0 * m * n * k)
            times.append(t)
        _, rate = fit_overhead_and_rate(flops, times)
        rates.append((dtype, rate))
        logger.info("matmul %s: %.1f GFLOP/s", dtype, rate / 1e9)
    return tuple(samples), tuple(rates)


# The elementwise ops of a layer (GELU's tanh and pow, scaling, residual adds): the bytes term
# of the cost model stands for all of them, and on a CPU the transcendental ones run well
# below copy bandwidth. Bytes moved per element (fp32), for each statement.
_POINTWISE_MIX = (("torch.tanh(x)", 2), ("x * 0.5", 2), ("x + y", 3), ("x.pow(3)", 2), ("x.clone()", 2))


def measure_mem_bw(device: str = "cpu", min_run_time_s: float = 0.05) -> float:
    """Bytes per second (read + write) of a mix of elementwise ops, fitted over sizes."""
    import torch

    dev, sync, _ = _device(device)
    sizes, times = [], []
    numels = COPY_NUMEL + ((1 << 26,) if device == "cuda" else ())
    for numel in numels:
        x, y = torch.randn(numel, device=dev), torch.randn(numel, device=dev)
        stmt = "; ".join(s for s, _ in _POINTWISE_MIX)
        times.append(_median_s(stmt, {"x": x, "y": y, "torch": torch}, min_run_time_s, sync))
        sizes.append(float(sum(n for _, n in _POINTWISE_MIX) * numel * x.element_size()))
    return fit_overhead_and_rate(sizes, times)[1]


def _op_chain(x, aten):
    # The kinds of calls a stage program makes: views, elementwise, reductions-free math.
    for _ in range(_CHAIN_LEN // 5):
        x = aten.mul.Tensor(x, 1.0001)
        x = aten.add.Tensor(x, x)
        x = aten.view.default(x, [-1])
        x = aten.view.default(x, [4, 4])
        x = aten.tanh.default(x)
    return x


def measure_op_overhead(device: str = "cpu", min_run_time_s: float = 0.1) -> tuple[float, float]:
    """Per-op seconds of an ATen call on a tiny tensor with autograd on: (forward, backward)."""
    import torch

    dev, sync, _ = _device(device)
    x = torch.randn(4, 4, device=dev, requires_grad=True)
    g = {"chain": _op_chain, "x": x, "aten": torch.ops.aten}
    fwd = _median_s("chain(x, aten)", g, min_run_time_s, sync)
    # The backward alone: Timer cannot leave the forward out of the timed statement, and
    # subtracting two noisy medians can go negative, so time each backward by hand.
    import time

    times = []
    deadline = time.perf_counter() + 2 * min_run_time_s
    while len(times) < 20 or time.perf_counter() < deadline:
        loss = _op_chain(x, torch.ops.aten).sum()
        start = time.perf_counter()
        loss.backward()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    bwd = sorted(times)[len(times) // 2]
    return fwd / _CHAIN_LEN, bwd / _CHAIN_LEN


def measure_optimizer(device: str = "cpu", num_tensors: int = 16, min_run_time_s: float = 0.1) -> float:
    """Seconds per parameter tensor of an AdamW step on small tensors (the per-tensor loop)."""
    import torch

    dev, sync, _ = _device(device)
    params = [torch.nn.Parameter(torch.randn(16, 16, device=dev)) for _ in range(num_tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-6)
    opt.step()
    return _median_s("opt.step()", {"opt": opt}, min_run_time_s, sync) / num_tensors


# ---------------------------------------------------------------- measuring links


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comm_worker(rank: int, world: int, port: int, device: str, out_file: str, repeats: int) -> None:
    import time

    import torch
    import torch.distributed as dist

    from hetcompile.runtime.collectives import all_reduce, isend

    torch.set_num_threads(1)
    backend = "nccl" if device == "cuda" else "gloo"
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def compute_gap(gap_s=COMM_GAP_S):
        end = time.perf_counter() + gap_s
        while time.perf_counter() < end:
            pass

    def one_way(x, y, send=isend) -> float:
        """Rank 0 sends ``x`` to rank 1 and goes on computing; rank 1 waits for it, its receive
        posted before (NOTE: [receives in flight]). Returns when rank 0 sent (rank 0) or rank 1
        got it (rank 1), on the clock every process of the machine shares."""
        posted = dist.irecv(y, 0) if rank == 1 else None
        sync()
        compute_gap()
        if rank == 0:
            at = time.perf_counter()
            work = send(x, 1)  # as a rank sends (NOTE: [handing a send over])
            posts.append(time.perf_counter() - at)
            compute_gap()
            work.wait()
        elif rank == 1:
            posted.wait()
            sync()
            at = time.perf_counter()
        else:
            at = 0.0
        return at

    samples, posts = [], []
    dist.barrier()
    # NOTE: [collectives as a step meets them] In training a collective or a transfer comes after
    # compute, with every rank's communication threads idle since the last one; one right after
    # another (a hot loop) finds them awake and pipelines, and on gloo over local sockets costs a
    # fraction of it (4 KB all-reduce on 2 CPU ranks: about 0.1 ms in a loop, 0.6-0.9 ms after a
    # barrier and 5 ms of compute). So each sample is one operation after a barrier and
    # COMM_GAP_S of compute on every rank; a fixed count (a collective must be called as often
    # on every rank), and their mean, leaving out the fastest and slowest tenth: a step pays
    # every transfer's latency, so it takes their sum, which follows their mean. The median
    # would not: on the 2-vCPU development VM one-way gloo latencies after a compute gap fall
    # in two bands, 0.13-0.45 ms and 1-3 ms, and the median of a few dozen jumped between them (0.27
    # and 1.66 ms in runs a minute apart, where the means were 0.80 and 1.74 ms).
    # A transfer is timed one way, as a pipeline meets it (one_way): the receiver posted its
    # receive before, and the sender goes on computing after the send, so the sender's
    # communication thread competes with its compute for a core. On the development VM that
    # is what a rank's step showed: a gradient sent by a rank that went on to its next backward
    # took 1.5 ms to arrive (a measured trace), where a ping-pong between two waiting ranks
    # had measured 0.13-0.38 ms one way.
    for num_bytes in COMM_BYTES:
        x = torch.zeros(max(num_bytes // 4, 1), device=dev)
        y = torch.empty_like(x)
        for kind in ("p2p", "allreduce"):
            rounds = []
            for _ in range(4 * repeats + 2):  # two warm-up rounds
                dist.barrier()
                if kind == "p2p":
                    rounds.append(one_way(x, y))
                    continue
                sync()
                compute_gap()
                start = time.perf_counter()
                all_reduce(x)  # as the ranks do (NOTE: [polling collectives])
                sync()
                rounds.append(time.perf_counter() - start)
            if kind == "p2p":
                # NOTE: [posting a transfer] Posting a send takes the sender's main thread a
                # median of about 0.1 ms on the development VM, but now and then a scheduler tick
                # (gloo's loop thread waiting for a core): 3-11% of posts took over 1 ms, means of
                # 0.2-0.56 ms. A step pays every post, so the plain mean of the sends posted after
                # compute, while the receiver computes too, leaving out the warm-up rounds.
                samples.append(("p2p_post", x.numel() * 4, sum(posts[2:]) / max(len(posts) - 2, 1)))
                posts.clear()
                # rank 1 holds the arrivals, rank 0 the departures
                stamps = torch.tensor(rounds, dtype=torch.float64)
                both = [torch.zeros_like(stamps) for _ in range(world)]
                dist.all_gather(both, stamps)
                rounds = (both[1] - both[0]).tolist()
            samples.append((kind, x.numel() * 4, _trimmed_mean(rounds[2:])))
    # NOTE: [all-reduces after a backward] A stage's gradient all-reduce (and a tied parameter's)
    # comes after its whole backward, tens of ms of compute on a CPU. After that long, an all-reduce
    # more often waits for a scheduler tick: on the development VM, 256 KB between two ranks took
    # 0.3-0.7 ms or 2.8-6.1 ms, about half of each, after 20-40 ms of matmuls (2026-11-25), and in
    # training a tied embedding's 256 KB took 4.1 ms against 0.8 ms predicted from all-reduces
    # timed after 2 ms. So those all-reduces are timed after GRAD_GAP_S of compute as well.
    for num_bytes in GRAD_BYTES:
        x = torch.zeros(max(num_bytes // 4, 1), device=dev)
        rounds = []
        for _ in range(4 * repeats + 2):  # two warm-up rounds
            dist.barrier()
            sync()
            compute_gap(GRAD_GAP_S)
            start = time.perf_counter()
            all_reduce(x)
            sync()
            rounds.append(time.perf_counter() - start)
        samples.append(("grad_allreduce", x.numel() * 4, _trimmed_mean(rounds[2:])))
    if device == "cpu":
        samples.append(("p2p_full_cores", 4, _trimmed_mean(_full_cores_one_way(one_way, rank, world, repeats))))
    if rank == 0:
        Path(out_file).write_text(json.dumps(samples))
    dist.barrier()
    dist.destroy_process_group()


def _full_cores_one_way(one_way, rank: int, world: int, repeats: int) -> list[float]:
    """One-way seconds of a 4-byte transfer with every core of the machine computing.

    NOTE: [transfers on full cores] Where a node runs more CPU ranks than it has cores, a rank
    does not yield its core after posting a send (NOTE: [handing a send over]), and gloo's thread
    that moves the data waits for a core while the other ranks compute: on the project's 2-vCPU
    VM, a 4-byte one-way transfer between two ranks took 31-45 us with a core each, and 2.3-4.2
    ms (trimmed means of 56) with a third process computing, about half a 4 ms scheduler tick
    and more (2026-11-25). So, for the predictor's nodes of shared cores (NOTE: [shared cores]
    in hetcompile/predict.py), the sender keeps its core here and rank 0 starts a busy process
    on each core the sender does not use; the other ranks wait for the result.
    """
    import subprocess
    import sys

    import torch
    import torch.distributed as dist

    from hetcompile.runtime.collectives import usable_cores

    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(usable_cores() - 1 if rank == 0 else 0)]
    try:
        x, y = torch.zeros(1), torch.empty(1)
        rounds = []
        for _ in range(4 * repeats + 2):  # two warm-up rounds
            dist.barrier()
            rounds.append(one_way(x, y, send=dist.isend))
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    stamps = torch.tensor(rounds, dtype=torch.float64)
    both = [torch.zeros_like(stamps) for _ in range(world)]
    dist.all_gather(both, stamps)
    return (both[1] - both[0]).tolist()[2:]


def _trimmed_mean(values: list[float]) -> float:
    """The mean without the fastest and the slowest tenth.

    >>> _trimmed_mean([1.0] * 9 + [100.0])
    1.0
    """
    values = sorted(values)
    cut = len(values) // 10
    kept = values[cut:len(values) - cut]
    return sum(kept) / len(kept)


def _latency_and_bw(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Latency: the smallest message's time. Bandwidth: the largest message's extra time over it.

    Two points rather than a fit over all sizes: on a loaded machine one slow mid-size
    sample tilts a least-squares line enough to make the latency 0 or negative.

    >>> lat, bw = _latency_and_bw([(4, 1e-5), (1004, 1e-5 + 1e-6)])
    >>> lat, round(bw / 1e9, 6)
    (1e-05, 1.0)
    """
    points = sorted(points)
    (small_bytes, small_s), (large_bytes, large_s) = points[0], points[-1]
    extra_s = large_s - small_s
    bw = (large_bytes - small_bytes) / extra_s if extra_s > 0 else large_bytes / large_s
    return small_s, bw


def measure_comm(num_ranks: int, device: str = "cpu", repeats: int = 7) -> CommProfile:
    """p2p and all-reduce among ``num_ranks`` local processes, fitted to latency + bytes / bw."""
    import torch.multiprocessing as mp

    if num_ranks < 2:
        raise UserError(f"--ranks {num_ranks}: links need at least 2 ranks. Pass --ranks 2 (or more), or leave "
                        "it out to profile only the device.")
    with tempfile.TemporaryDirectory(prefix="hetcompile-profile-") as tmp:
        out_file = os.path.join(tmp, "comm.json")
        mp.spawn(_comm_worker, args=(num_ranks, _free_port(), device, out_file, repeats), nprocs=num_ranks)
        samples = [tuple(s) for s in json.loads(Path(out_file).read_text())]
    p2p_lat, p2p_bw = _latency_and_bw([(b, t) for k, b, t in samples if k == "p2p"])
    posts = [t for k, _, t in samples if k == "p2p_post"]
    ar_lat, ar_rate = _latency_and_bw([(b, t) for k, b, t in samples if k == "allreduce"])
    grad_lat, grad_rate = _latency_and_bw([(b, t) for k, b, t in samples if k == "grad_allreduce"])
    # Ring: t = 2(n-1) latency + 2(n-1)/n bytes / bw, so the per-link numbers are:
    n = num_ranks
    return CommProfile(num_ranks=n, backend="nccl" if device == "cuda" else "gloo",
                       p2p_latency_s=max(p2p_lat, 1e-9), p2p_bw_bytes_per_s=p2p_bw,
                       allreduce_latency_s=max(ar_lat / (2 * (n - 1)), 1e-9),
                       allreduce_bw_bytes_per_s=ar_rate * 2 * (n - 1) / n,
                       p2p_post_s=sum(posts) / len(posts) if posts else 0.0,
                       p2p_full_cores_latency_s=next((t for k, _, t in samples if k == "p2p_full_cores"), 0.0),
                       grad_allreduce_latency_s=max(grad_lat / (2 * (n - 1)), 1e-9),
                       grad_allreduce_bw_bytes_per_s=grad_rate * 2 * (n - 1) / n,
                       samples=tuple((k, int(b), float(t)) for k, b, t in samples))


def measure_profile(device: str = "cpu", *, num_ranks: int = 1, num_threads: int = 1,
                    dtypes: tuple[str, ...] | None = None, quick: bool = False, models=()) -> DeviceProfile:
    """Measure this machine's ``device`` (and, with ``num_ranks >= 2``, its local links).

    ``num_threads`` is torch's intra-op thread count during the measurement; on a CPU
    use what each rank will run with (``hetcompile run`` gives every rank one thread).
    ``models``: model files whose own blocks to time too (:mod:`hetcompile.block_profile`).

    >>> p = measure_profile("cpu", quick=True)  # doctest: +SKIP
    >>> p.flops_per_s("fp32") > 0  # doctest: +SKIP
    True
    """
    import torch

    from hetcompile.runtime.collectives import usable_cores

    if num_threads < 1:
        raise UserError(f"--threads {num_threads}: use at least 1 thread.")
    _, _, name = _device(device)
    dtypes = dtypes or (("fp32", "bf16", "fp16") if device == "cuda" else ("fp32", "bf16"))
    run_s = 0.02 if quick else 0.1
    with torch_threads(num_threads):
        samples, rates = measure_matmul(device, dtypes, min_run_time_s=run_s / 2)
        mem_bw = measure_mem_bw(device, min_run_time_s=run_s / 2)
        op_fwd, op_bwd = measure_op_overhead(device, min_run_time_s=run_s)
        optimizer = measure_optimizer(device, min_run_time_s=run_s)
    block_times: dict[str, BlockTime] = {}
    optimizer_times: dict[str, OptimizerTime] = {}
    calls: list[tuple[float, float]] = []
    if models:
        from hetcompile.block_profile import measure_blocks, measure_model_optimizer

        for model in models:
            times, call = measure_blocks(model, device, num_threads=num_threads,
                                         min_run_time_s=run_s / 2 if quick else run_s)
            calls.append(call)
            for t in times:
                block_times.setdefault(t.signature, t)
            o = measure_model_optimizer(model, device, num_threads=num_threads, min_run_time_s=run_s)
            optimizer_times.setdefault(o.signature, o)
    comm = measure_comm(num_ranks, device, repeats=3 if quick else 7) if num_ranks >= 2 else None
    profile = DeviceProfile(
        device=device, device_name=name, num_threads=num_threads, matmul_flops_per_s=rates,
        mem_bw_bytes_per_s=mem_bw, op_fwd_overhead_s=op_fwd, op_bwd_overhead_s=op_bwd,
        optimizer_per_tensor_s=optimizer, comm=comm, torch_version=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        matmul_samples=samples, block_times=tuple(block_times.values()),
        optimizer_times=tuple(optimizer_times.values()),
        stage_call_fwd_s=min((c[0] for c in calls), default=0.0), stage_call_bwd_s=min((c[1] for c in calls), default=0.0),
        num_cores=usable_cores() if device == "cpu" else 0)
    logger.info("profile: %s", summary(profile))
    return profile


def summary(profile: DeviceProfile) -> str:
    """A few lines a person reads after ``hetcompile profile``."""
    lines = [f"device       {profile.device} ({profile.device_name}), {profile.num_threads} thread(s), "
             f"torch {profile.torch_version}"]
    for d, r in profile.matmul_flops_per_s:
        measured = [2.0 * m * n * k / t / 1e9 for dt, m, n, k, t in profile.matmul_samples if dt == d and t > 0]
        spread = f" fitted; {min(measured):.1f} to {max(measured):.1f} over the shapes" if measured else ""
        lines.append(f"matmul {d:<5} {r / 1e9:10.2f} GFLOP/s{spread}")
    lines.append(f"memory bw    {profile.mem_bw_bytes_per_s / 1e9:10.2f} GB/s (elementwise mix, read + write)")
    lines.append(f"per-op       {profile.op_fwd_overhead_s * 1e6:10.2f} us forward, "
                 f"{profile.op_bwd_overhead_s * 1e6:.2f} us backward")
    lines.append(f"optimizer    {profile.optimizer_per_tensor_s * 1e6:10.2f} us per parameter tensor "
                 "(AdamW, for a model whose own is not measured)")
    if profile.block_times:
        lines.append(f"stage call   {profile.stage_call_fwd_s * 1e6:10.2f} us forward, "
                     f"{profile.stage_call_bwd_s * 1e6:.2f} us backward (per stage and micro-batch)")
    for b in profile.block_times:
        lines.append(f"block        {b.fwd_fixed_s * 1e6:8.1f} + {b.fwd_per_sample_s * 1e6:.1f} us/sample forward, "
                     f"{b.bwd_fixed_s * 1e6:.1f} + {b.bwd_per_sample_s * 1e6:.1f} us/sample backward: {b.name}")
    for o in profile.optimizer_times:
        lines.append(f"optimizer    {o.fixed_s * 1e6:10.2f} us + {o.per_tensor_s * 1e6:.2f} us per tensor + "
                     f"{o.per_byte_s * 1e12:.1f} us/MB a step: {o.name}")
    if profile.comm is not None:
        c = profile.comm
        lines.append(f"p2p          {c.p2p_latency_s * 1e6:10.2f} us + bytes / {c.p2p_bw_bytes_per_s / 1e9:.2f} GB/s "
                     f"({c.backend}, {c.num_ranks} ranks)")
        lines.append(f"all-reduce   {c.allreduce_latency_s * 1e6:10.2f} us + bytes / "
                     f"{c.allreduce_bw_bytes_per_s / 1e9:.2f} GB/s per ring link")
        if c.grad_allreduce_bw_bytes_per_s > 0:
            lines.append(f"  gradients  {c.grad_allreduce_latency_s * 1e6:10.2f} us + bytes / "
                         f"{c.grad_allreduce_bw_bytes_per_s / 1e9:.2f} GB/s per ring link, after a backward")
        if c.p2p_post_s > 0:
            lines.append(f"posting      {c.p2p_post_s * 1e6:10.2f} us of the rank's own time per send or receive")
        if c.p2p_full_cores_latency_s > 0:
            lines.append(f"full cores   {c.p2p_full_cores_latency_s * 1e6:10.2f} us one way while every core computes")
    return "\n".join(lines)
