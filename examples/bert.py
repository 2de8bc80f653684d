"""BERT (small, random weights) for masked-language modelling, from a transformers config.

The padding mask comes with the batch, so every layer reads the same mask tensor:
a value that crosses every pipeline cut.

    hetcompile examples/bert.py --cluster examples/a100_v100.json -o out/bert
"""

import torch
from transformers import BertConfig, BertForMaskedLM

BATCH = 16
SEQ = 32
CONFIG = BertConfig(
    num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=512,
    max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    attn_implementation="eager",
)


def get_model() -> torch.nn.Module:
    return BertForMaskedLM(CONFIG)


def get_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, CONFIG.vocab_size, (BATCH, SEQ), generator=g)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()  # padded to SEQ
    hidden = torch.rand(BATCH, SEQ, generator=g) < 0.15  # 15% of the tokens replaced by [MASK] (id 0)
    # Every position has a label, so each sample weighs the same in the mean loss (an ignore_index
    # would weigh micro-batches by their labelled tokens, which no split of the batch keeps).
    return {"input_ids": torch.where(hidden, 0, ids), "attention_mask": mask, "labels": ids}


def get_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-4)
