"""GPT-2 Large (774M parameters, random weights) from a transformers config: a model to plan, not to run here.

Planning builds it on fake tensors, so this needs no GPU and little memory:

    hetcompile examples/gpt2_large.py --cluster examples/a100_v100.json -o out/gpt2_large

Training it with `hetcompile run` on a CPU would take hours a step; launch the
emitted plan on the cluster it was compiled for (OUT/launch.sh).
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

BATCH = 32
SEQ = 1024
CONFIG = GPT2Config(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=SEQ,
                    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


def get_model() -> torch.nn.Module:
    return GPT2LMHeadModel(CONFIG)


def get_batch(step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}
