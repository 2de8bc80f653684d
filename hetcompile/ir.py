"""Plain data that flows from the passes to the planner.

After capture, everything the planner sees is frozen dataclasses keyed by
names and integer indices, never live fx nodes (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """A group of graph nodes that is never split across pipeline stages (a layer).

    Per-sample numbers are measured at the capture batch size and divided by it.
    """

    index: int
    name: str  # module path, e.g. "model.transformer.h.3", or "pre" / "post"
    fwd_flops_per_sample: float  # from torch.utils.flop_counter
    fwd_bytes_per_sample: float  # bytes read and written by the forward ops
    param_bytes: int  # parameters first used by this block (fp32 bytes as captured)
    num_params: int
    act_bytes_per_sample: float  # activations saved for backward
    out_bytes_per_sample: float  # bytes of tensors crossing the cut after this block
    # Counts for the per-call costs a profiled device adds (cost_models/profile.py):
    # each ATen call costs a fixed time, each parameter tensor an optimizer-loop turn.
    num_ops: int = 0  # ATen calls in the forward
    num_grad_ops: int = 0  # of those, the ones autograd records (they run in backward too)
    num_param_tensors: int = 0
    num_matmul_ops: int = 0  # of those, the ones with FLOPs (mm, addmm, bmm, attention, conv)
    # Hash of the block's ops, shapes and dtypes (hetcompile/block_profile.py): identical layers
    # share it, and a device profile's measured block times are keyed by it.
    signature: str = ""
    # Tensor parallelism (passes/partition_ops.py fills these in; the planner prices TP with them).
    tp_flops_fraction: float = 0.0  # of the forward FLOPs, the fraction in ops TP splits (sharded matmuls, attention)
    tp_param_fraction: float = 0.0  # of the param bytes, the fraction TP shards
    tp_comm_bytes_per_sample: float = 0.0  # all-reduced over the TP group per sample in forward (backward: same again)
    tp_units: int = 1  # the most ways the block splits (e.g. KV heads); 1 = no TP possible


@dataclass(frozen=True)
class SharedParams:
    """Parameters that several blocks use (tied input and output embeddings): counted in the
    first block's ``param_bytes``; when the blocks fall in different stages, every rank that holds
    them sums their gradients with the others (lowering.grad_groups)."""

    blocks: tuple[int, ...]  # the blocks that use them, in order
    param_bytes: int
    num_param_tensors: int


@dataclass(frozen=True)
class ModelCosts:
    """What the planner needs to know about the model: its blocks, in order."""

    blocks: tuple[Block, ...]
    global_batch: int
    dtype: str  # "fp32", "bf16" or "fp16": the dtype of the parameters
    shared_params: tuple[SharedParams, ...] = ()
    # The model file's optimizer, as a device profile keys its measured step
    # (hetcompile/block_profile.py: optimizer_signature); "" prices it as AdamW.
    optimizer: str = ""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)
