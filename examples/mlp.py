"""A small MLP regression model: the smallest model file hetcompile accepts.

    hetcompile examples/mlp.py --cluster examples/a100_v100.json -o out/mlp
"""

import torch

BATCH = 32
WIDTH = 64
DEPTH = 6


def get_model() -> torch.nn.Module:
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU()]
    layers.append(torch.nn.Linear(WIDTH, 1))
    return torch.nn.Sequential(*layers)


def get_batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, WIDTH, generator=g)
    y = x.sum(dim=1, keepdim=True).sin()
    return x, y


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output, target)


def get_optimizer(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)
