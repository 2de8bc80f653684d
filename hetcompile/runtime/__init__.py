"""The small library that emitted per-rank programs import.

An emitted ``rank_R.py`` is a straight list of the calls below, one action of
the schedule after another; :class:`RankContext` holds the state between them
(parameters, received tensors, saved activations) and talks to
``torch.distributed``.
"""

from hetcompile.runtime.context import RankContext

__all__ = ["RankContext"]
