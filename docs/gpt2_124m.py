"""GPT-2 small sizes (12 layers, 768 wide, 50257 vocab, 1024 tokens; random weights): the model of
the README's timeline picture, docs/timeline_gpt2.png. Planning never materialises its weights.

    hetcompile docs/gpt2_124m.py --cluster examples/h100_a100_t4.json --microbatches 8 -o out/gpt2_124m
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

BATCH = 64
SEQ = 1024
CONFIG = GPT2Config(
    n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=SEQ,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # dropout off: runs must be comparable
    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
)


def get_model() -> torch.nn.Module:
    return GPT2LMHeadModel(CONFIG)


def get_batch(step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}


def get_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-4)
