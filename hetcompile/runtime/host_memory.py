"""Keep freed host memory in the process, so that a CPU rank's steps do not fault it back in.

NOTE: [freed host memory] A CPU rank allocates and frees the same activations every step.
glibc's malloc hands large freed blocks back to the OS (``munmap``, and trimming the top of the
heap), and the next step faults every page of them in again, in kernel time. On the 2-vCPU
development VM a one-rank GPT-2 plan (examples/gpt2.py, 14 steps) spent 0-35 ms of its ~160 ms
steps in the kernel on 0-23,000 minor page faults, and its steps without faults were the fast
ones (151-153 ms, against 162-186 ms for steps of 8,000-23,000 faults). The block profile times
each block at one size over and over, which reuses its memory: it saw no faults, and predicted
153 ms. Raising malloc's mmap threshold to its maximum (32 MiB on 64-bit glibc) and never
trimming the heap keeps the freed memory for the next step: after two steps that rank spent no
kernel time (sys 0.0 ms a step). Setting the trim threshold alone is worse than nothing: it
also fixes the mmap threshold at 128 KiB, so every activation over that is mapped and faulted
anew (GPT-2 plans ran 1.8x slower that way). GPU ranks keep their tensors in the CUDA caching allocator; this is for
CPU ranks and for the block profile that predicts them.
"""

from __future__ import annotations

import ctypes
import functools

# mallopt(3) parameters and glibc's largest mmap threshold on 64-bit systems.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20
_INT_MAX = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory (NOTE: [freed host memory]); False where there
    is no glibc ``mallopt`` (macOS, musl), which leaves the allocator as it is."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
