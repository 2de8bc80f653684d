"""The user's model file: what it must define, and the training step it implies.

A model file is plain Python that defines:

- ``get_model() -> torch.nn.Module`` (hetcompile seeds torch before calling it),
- ``get_batch(step: int)`` -> the global batch of that step, batch on dim 0,
- optionally ``loss_fn(output, targets) -> Tensor``; then ``get_batch`` returns
  ``(inputs, targets)`` and the loss is ``loss_fn(model(inputs), targets)``,
- optionally ``get_optimizer(params) -> torch.optim.Optimizer``
  (default: :func:`default_optimizer`).

Inputs are passed as keyword arguments (a dict), positional arguments (a tuple
or list) or one tensor. Without ``loss_fn`` the model's output is the loss: a
scalar, or carried as ``.loss`` / ``["loss"]`` (the Hugging Face convention).
Either way the loss must be a mean over the batch's samples: that is what lets
a plan split a batch unevenly and weight each piece by its share.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from hetcompile.errors import UserError

REQUIRED = ("get_model", "get_batch")
OPTIONAL = ("loss_fn", "get_optimizer")


def default_optimizer(params) -> torch.optim.Optimizer:
    """The optimizer used when the model file defines no ``get_optimizer``: AdamW, lr 1e-3."""
    return torch.optim.AdamW(params, lr=1e-3)


@dataclass(frozen=True)
class ModelFile:
    """The functions a model file defines (see the module docstring)."""

    path: Path
    get_model: Callable[[], torch.nn.Module]
    get_batch: Callable[[int], Any]
    loss_fn: Callable[[Any, Any], torch.Tensor] | None
    get_optimizer: Callable[[Any], torch.optim.Optimizer]
    # What the plan directory gets as model.py (and the data files it reads); the file itself when None.
    source: str | None = None
    data_files: dict[str, bytes] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def source_text(self) -> str:
        return self.path.read_text() if self.source is None else self.source

    def build_model(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.get_model()

    def flat_batch(self, step: int) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
        """The batch of ``step`` as a flat list of tensors (batch on dim 0) and its structure."""
        try:
            batch = self.get_batch(step)
        except Exception as e:  # the user's code: report it as theirs, with its own message
            raise UserError(f"{self.path.name}: get_batch({step}) raised {type(e).__name__}: {e}. Fix get_batch so "
                            "that it returns the global batch of any step (batch on dim 0).") from e
        leaves, spec = pytree.tree_flatten(batch)
        if not leaves:
            raise UserError(f"{self.path.name}: get_batch({step}) returned no tensors. "
                            "Return the model's inputs as a tensor, a tuple or a dict of tensors "
                            "(or (inputs, targets) when the file defines loss_fn).")
        sizes = set()
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
                raise UserError(f"{self.path.name}: get_batch({step}) returned a {type(leaf).__name__} "
                                f"at position {i} of its flattened structure; every leaf must be a tensor "
                                "with the batch on dim 0. Move constants into the model.")
            sizes.add(leaf.shape[0])
        if len(sizes) != 1:
            raise UserError(f"{self.path.name}: the tensors of get_batch({step}) disagree on the batch size "
                            f"(dim 0 sizes {sorted(sizes)}). Put the batch on dim 0 of every tensor.")
        return leaves, spec


def load_model_file(path: str | Path) -> ModelFile:
    """Import a model file and check that it defines what hetcompile needs.

    >>> mf = load_model_file("examples/mlp.py")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file {str(path)!r} does not exist. Pass the path of a Python file "
                        f"that defines {', '.join(REQUIRED)} (and optionally {', '.join(OPTIONAL)}).")
    name = f"hetcompile_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: report it, without our traceback
        raise UserError(f"Importing model file {str(path)!r} failed: {type(e).__name__}: {e}. "
                        "Fix the file so that `python FILE` runs without error.") from e
    missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == name)
        raise UserError(
            f"Model file {str(path)!r} does not define {', '.join(missing)}. A model file must define "
            "get_model() -> torch.nn.Module and get_batch(step) -> the global batch (batch on dim 0), "
            "and may define loss_fn(output, targets) and get_optimizer(params). "
            f"It defines: {', '.join(defined) or 'no functions'}.")
    return ModelFile(
        path=path.resolve(),
        get_model=module.get_model,
        get_batch=module.get_batch,
        loss_fn=getattr(module, "loss_fn", None),
        get_optimizer=getattr(module, "get_optimizer", default_optimizer),
    )


_MODULE_SOURCE = '''"""Model file written by hetcompile.compile(module, cluster, example_inputs).

The module (with its initial weights), the example batch and the optimizer
factory were pickled with torch.save; every training step uses that batch. The
module's class must be importable where the ranks run.
"""

from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent


def get_model():
    return torch.load(_HERE / "module.pt", weights_only=False)


def get_batch(step):
    return torch.load(_HERE / "batch.pt", weights_only=False)


def get_optimizer(params):
    return torch.load(_HERE / "optimizer.pt", weights_only=False)(params)
'''


def module_model_file(module: torch.nn.Module, example_inputs: Any, optimizer=None) -> ModelFile:
    """A :class:`ModelFile` for an in-memory module whose output is the loss on ``example_inputs``.

    The plan directory gets a generated model.py that loads the pickled module,
    batch and ``optimizer`` (a picklable ``params -> Optimizer`` factory, such as
    ``functools.partial(torch.optim.AdamW, lr=1e-4)``; default
    :func:`default_optimizer`), so the ranks train from the module's current
    weights on that batch at every step.

    >>> mf = module_model_file(model, {"input_ids": ids, "labels": ids})  # doctest: +SKIP
    """
    cls = type(module)
    if example_inputs is None:
        raise UserError(f"hetcompile.compile got a {cls.__name__} module without example_inputs. Pass the "
                        "global batch the module's forward takes (a tensor, a tuple or a dict, batch on dim 0) "
                        "and on which the module returns the loss, e.g. compile(model, cluster, "
                        "{'input_ids': ids, 'labels': ids}).")
    if cls.__module__ == "__main__":
        raise UserError(f"The module's class {cls.__name__} is defined in __main__, so the rank processes "
                        "cannot import it to rebuild the model. Move the class into an importable module, or "
                        "write a model file (get_model, get_batch) and compile that.")
    optimizer = optimizer or default_optimizer
    data_files = {}
    for name, obj in (("module.pt", module), ("batch.pt", example_inputs), ("optimizer.pt", optimizer)):
        buf = io.BytesIO()
        try:
            torch.save(obj, buf)
        except Exception as e:
            raise UserError(f"hetcompile.compile could not pickle the {name.removesuffix('.pt')} "
                            f"({type(e).__name__}: {e}); the ranks rebuild it from a pickle. Pass objects "
                            "defined at module level (for the optimizer, e.g. functools.partial("
                            "torch.optim.AdamW, lr=1e-4) rather than a lambda).") from e
        data_files[name] = buf.getvalue()
    return ModelFile(
        path=Path(f"<{cls.__name__} module>"),
        get_model=lambda: copy.deepcopy(module),
        get_batch=lambda step: example_inputs,
        loss_fn=None,
        get_optimizer=optimizer,
        source=_MODULE_SOURCE,
        data_files=data_files,
    )


def _call(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _loss_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        loss = output
    elif getattr(output, "loss", None) is not None:
        loss = output.loss
    elif isinstance(output, dict) and "loss" in output:
        loss = output["loss"]
    else:
        raise UserError(f"The model returned a {type(output).__name__} without a loss. Without loss_fn the "
                        "model's output must be the loss (a scalar tensor, or .loss / ['loss']). "
                        "Define loss_fn(output, targets) in the model file, or pass labels in the batch.")
    if loss.dim() != 0:
        raise UserError(f"The loss has shape {tuple(loss.shape)}; it must be a scalar mean over the batch. "
                        "Reduce it with .mean() in the model or in loss_fn.")
    return loss


class TrainingLoss(torch.nn.Module):
    """``model`` plus its loss, as one module taking the flattened batch.

    This is what hetcompile captures: its only output is the scalar loss, so
    every stage's work, the loss included, lives in one graph.
    """

    def __init__(self, model: torch.nn.Module, loss_fn, batch_spec: pytree.TreeSpec):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.batch_spec = batch_spec

    def forward(self, *flat: torch.Tensor) -> torch.Tensor:
        batch = pytree.tree_unflatten(list(flat), self.batch_spec)
        if self.loss_fn is None:
            return _loss_of(_call(self.model, batch))
        inputs, targets = batch
        return _loss_of(self.loss_fn(_call(self.model, inputs), targets))


def reference_training(mf: ModelFile, *, steps: int, seed: int = 0) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train the model on one device, the way a plan must reproduce: losses and final state dict.

    >>> losses, state = reference_training(load_model_file("examples/mlp.py"), steps=2)  # doctest: +SKIP
    """
    model = mf.build_model(seed)
    model.train()
    optimizer = mf.get_optimizer([p for p in model.parameters()])
    losses = []
    for step in range(steps):
        flat, spec = mf.flat_batch(step)
        loss = TrainingLoss(model, mf.loss_fn, spec)(*flat)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
