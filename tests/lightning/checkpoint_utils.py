"""Tiny decoders saved the way `fit` saves them, for the eval / export / generate tests (no training)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from parallax_lightning.model import Decoder, DecoderConfig

BYTE_VOCAB = 320  # the byte tokenizer's 257 tokens, padded to a multiple of 64 as the data modules do


def tiny_decoder(**overrides) -> Decoder:
    fields = dict(
        vocab_size=BYTE_VOCAB,
        max_seq_len=32,
        d_model=32,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        mlp_hidden=64,
        attention="parallax",
        init_std=0.2,  # spread logits: greedy choices are then no near-ties
        attn_backend="reference",
    )
    fields.update(overrides)
    return Decoder(DecoderConfig(**fields)).eval()


def save_checkpoint(model: Decoder, path: Path, tokenizer: str | None = "byte", **extra) -> Path:
    """A checkpoint with the keys LanguageModelModule and Lightning write (decoder weights under 'model.')."""
    checkpoint = {
        "global_step": 7,
        "state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": dataclasses.asdict(model.config), "compile": False},
        "datamodule_hyper_parameters": {"tokenizer": tokenizer, "seq_len": model.config.max_seq_len},
    }
    checkpoint.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


LETTERS = b"abcdefghijklmnopqrstuvwxyz "


@torch.no_grad()
def letter_decoder(**overrides) -> Decoder:
    """A decoder whose greedy choices are lower-case letters or spaces: its output head scores every other
    token 0 and those 27 with large random weights (so one of them is above 0 with probability 1 - 2^-27).
    Text from it is plain ASCII, so stop strings can be cut from it without landing inside a character."""
    model = tiny_decoder(tie_embeddings=False, **overrides)
    weight = torch.zeros_like(model.lm_head.weight)
    weight[list(LETTERS)] = torch.randn(len(LETTERS), weight.shape[1])
    model.lm_head.weight.copy_(weight)
    return model
