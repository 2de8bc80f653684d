"""Llama (small, random weights, grouped-query attention) from a transformers config.

    hetcompile examples/llama.py --cluster examples/a100_v100.json -o out/llama
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BATCH = 16
SEQ = 32
CONFIG = LlamaConfig(
    num_hidden_layers=4, hidden_size=64, intermediate_size=176, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=SEQ,
    bos_token_id=0, eos_token_id=0, pad_token_id=0,
    use_cache=False,  # training: no key/value cache
)


def get_model() -> torch.nn.Module:
    return LlamaForCausalLM(CONFIG)


def get_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}


def get_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-4)
