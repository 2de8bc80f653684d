"""hetcompile: an ahead-of-time parallel-plan compiler for clusters of mixed accelerators.

>>> import hetcompile
>>> plan = hetcompile.compile("examples/gpt2.py", "examples/a100_v100.json")  # doctest: +SKIP
>>> plan.save("out/gpt2")  # doctest: +SKIP
>>> hetcompile.load("out/gpt2").summary()  # doctest: +SKIP
"""

from hetcompile.errors import UserError
from hetcompile.plan import Plan, load

__version__ = "0.1.0"


def compile(*args, **kwargs) -> Plan:
    """See :func:`hetcompile.compiler.compile`."""
    from hetcompile.compiler import compile as _compile

    return _compile(*args, **kwargs)


__all__ = ["Plan", "UserError", "compile", "load"]
