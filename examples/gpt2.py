"""GPT-2 (small, random weights, tied input/output embeddings) from a transformers config.

    hetcompile examples/gpt2.py --cluster examples/a100_v100.json -o out/gpt2
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

BATCH = 32
SEQ = 64
CONFIG = GPT2Config(
    n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=SEQ,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # dropout off: runs must be comparable
    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    use_cache=False,  # training: no key/value cache
)


def get_model() -> torch.nn.Module:
    return GPT2LMHeadModel(CONFIG)


def get_batch(step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}


def get_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-4)
