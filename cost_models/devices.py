"""Device catalog: datasheet numbers per accelerator type.

All FLOP/s figures are dense (no 2:4 sparsity) peak numbers from the vendor
datasheet named in each entry's ``source``.

# NOTE: [which FP32 number] ``fp32_tflops`` is the number a plain fp32 PyTorch
# training run gets. On NVIDIA parts that is the non-tensor-core FP32 rate:
# PyTorch has disabled TF32 for matmuls by default since 1.12
# (``torch.backends.cuda.matmul.allow_tf32 = False``), so TF32 is *not* the
# default. On AMD Instinct parts fp32 GEMMs run on the matrix cores (MFMA) in
# full IEEE fp32 through rocBLAS/hipBLASLt, so the "FP32 matrix" rate is used.

# NOTE: [intra-node bandwidth] ``intra_node_GBps`` is the per-direction GPU-to-GPU
# bandwidth of the usual interconnect of that part: half the aggregate
# bidirectional NVLink / Infinity Fabric figure of the datasheet, or the PCIe
# x16 per-direction rate for PCIe-only cards.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass

from cost_models.profile import DeviceProfile
from hetcompile.errors import UserError

logger = logging.getLogger(__name__)

DTYPES = ("fp32", "bf16", "fp16")
_BYTES_PER_GB = 1e9  # datasheets use decimal units (GB, GB/s, TFLOP/s)


@dataclass(frozen=True)
class DeviceType:
    """One accelerator type with its datasheet numbers.

    >>> a100 = CATALOG["A100-80GB"]
    >>> a100.peak_flops_per_s("bf16")
    312000000000000.0
    >>> CATALOG["V100-32GB"].peak_flops_per_s("bf16") == CATALOG["V100-32GB"].peak_flops_per_s("fp16")
    True
    """

    name: str
    fp32_tflops: float
    bf16_tflops: float  # 0 when the part has no bf16 path (falls back to fp16)
    fp16_tflops: float  # 0 when the part has no fp16 path (falls back to bf16)
    mem_GB: float
    mem_GBps: float
    intra_node_GBps: float
    source: str
    # Measured numbers (`hetcompile profile`) that replace the datasheet ones in the
    # cost model; None for a datasheet-only type.
    profile: DeviceProfile | None = None

    def peak_flops_per_s(self, dtype: str) -> float:
        """Peak dense FLOP/s for ``dtype`` ("fp32", "bf16" or "fp16").

        bf16 and fp16 stand in for each other when the datasheet gives 0 (a V100
        has no bf16 tensor cores; autocast users run fp16 instead), then fp32.
        """
        if dtype not in DTYPES:
            raise UserError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
        if dtype == "fp32":
            tflops = self.fp32_tflops
        elif dtype == "bf16":
            tflops = self.bf16_tflops or self.fp16_tflops or self.fp32_tflops
        else:
            tflops = self.fp16_tflops or self.bf16_tflops or self.fp32_tflops
        return tflops * 1e12

    @property
    def mem_bytes(self) -> int:
        return int(self.mem_GB * _BYTES_PER_GB)

    @property
    def mem_bw_bytes_per_s(self) -> float:
        return self.mem_GBps * _BYTES_PER_GB

    @property
    def intra_node_bw_bytes_per_s(self) -> float:
        return self.intra_node_GBps * _BYTES_PER_GB


def _entry(name, fp32, bf16, fp16, mem_GB, mem_GBps, intra_GBps, source) -> tuple[str, DeviceType]:
    return name, DeviceType(name, fp32, bf16, fp16, mem_GB, mem_GBps, intra_GBps, source)


CATALOG: dict[str, DeviceType] = dict(
    [
        # NVLink 4: 900 GB/s aggregate -> 450 per direction.
        _entry("H100-80GB", 67.0, 989.4, 989.4, 80, 3350, 450,
               "NVIDIA H100 Tensor Core GPU Datasheet (SXM5), nvidia.com/en-us/data-center/h100/"),
        # NVLink 3: 600 GB/s aggregate -> 300 per direction.
        _entry("A100-80GB", 19.5, 312.0, 312.0, 80, 2039, 300,
               "NVIDIA A100 Tensor Core GPU Datasheet (80GB SXM), nvidia.com/en-us/data-center/a100/"),
        _entry("A100-40GB", 19.5, 312.0, 312.0, 40, 1555, 300,
               "NVIDIA A100 Tensor Core GPU Datasheet (40GB SXM), nvidia.com/en-us/data-center/a100/"),
        # NVLink 2: 300 GB/s aggregate -> 150 per direction. No bf16 (uses fp16).
        _entry("V100-32GB", 15.7, 0.0, 125.0, 32, 900, 150,
               "NVIDIA Tesla V100 GPU Datasheet (SXM2), nvidia.com/en-us/data-center/v100/"),
        _entry("V100-16GB", 15.7, 0.0, 125.0, 16, 900, 150,
               "NVIDIA Tesla V100 GPU Datasheet (SXM2), nvidia.com/en-us/data-center/v100/"),
        # PCIe Gen3 x16: ~16 GB/s per direction. No bf16.
        _entry("T4-16GB", 8.1, 0.0, 65.0, 16, 320, 16,
               "NVIDIA T4 Tensor Core GPU Datasheet, nvidia.com/en-us/data-center/tesla-t4/"),
        # PCIe Gen4 x16: ~32 GB/s per direction.
        _entry("A10-24GB", 31.2, 125.0, 125.0, 24, 600, 32,
               "NVIDIA A10 Tensor Core GPU Datasheet, nvidia.com/en-us/data-center/products/a10-gpu/"),
        _entry("L4-24GB", 30.3, 121.0, 121.0, 24, 300, 32,
               "NVIDIA L4 Tensor Core GPU Datasheet, nvidia.com/en-us/data-center/l4/"),
        # Infinity Fabric: 800 GB/s aggregate peak -> 400 per direction. FP32 matrix rate.
        _entry("MI250X", 95.7, 383.0, 383.0, 128, 3276.8, 400,
               "AMD Instinct MI250X Accelerator Data Sheet, amd.com/en/products/accelerators/instinct/mi200/mi250x.html"),
        # Infinity Fabric: 896 GB/s aggregate peak -> 448 per direction. FP32 matrix rate.
        _entry("MI300X", 163.4, 1307.4, 1307.4, 192, 5300, 448,
               "AMD Instinct MI300X Accelerator Data Sheet, amd.com/en/products/accelerators/instinct/mi300/mi300x.html"),
        # A modest generic server CPU; a placeholder, not a datasheet part.
        _entry("CPU", 1.0, 0.0, 0.0, 64, 50, 10, "generic CPU placeholder (hetcompile estimate)"),
    ]
)


def suggest(name: str, choices) -> str:
    """A " Did you mean ...?" sentence for ``name`` among ``choices`` (case-insensitive), or ""."""
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(lower[c]) for c in close) + "?"


def lookup_device_type(name: str, catalog: dict[str, DeviceType] | None = None) -> DeviceType:
    """The catalog entry for ``name``, matched case-insensitively.

    >>> lookup_device_type("a100-80gb").name
    'A100-80GB'
    """
    catalog = CATALOG if catalog is None else catalog
    by_lower = {k.lower(): v for k, v in catalog.items()}
    if isinstance(name, str) and name.lower() in by_lower:
        return by_lower[name.lower()]
    raise UserError(
        f"Unknown device type {name!r}.{suggest(str(name), catalog)} Known types: "
        f"{', '.join(sorted(catalog))}. Use one of these names, or describe the device under "
        f'"devices" in the cluster spec, e.g. "devices": {{"{name}": {{"fp32_tflops": 20, '
        f'"bf16_tflops": 160, "mem_GB": 48, "mem_GBps": 900}}}}.'
    )
