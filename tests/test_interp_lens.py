"""Tests of `lmcourse.interp.activations_at` (activations kept at one position per row) and `lens_logits` (the logit
lens), on an lmcourse model and tiny random-init Hugging Face Llama and GPT-2 models, offline."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import pytest
import torch

from lmcourse.interp import HookedHF, activations_at, lens_logits
from lmcourse.model import ModelConfig, Transformer
from lmcourse.testing import fresh_seed


def models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    return {"lmcourse": lm.eval(), "llama": HookedHF(llama.eval()), "gpt2": HookedHF(gpt2.eval())}


MODELS = models()


@pytest.mark.parametrize("family", list(MODELS))
def test_activations_at_are_the_cache_at_those_positions(family):
    model = MODELS[family]
    g = torch.Generator().manual_seed(fresh_seed())
    tokens = torch.randint(0, 96, (4, 11), generator=g)
    pos = torch.randint(0, 11, (4,), generator=g)
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out", "norm.hook_scale"]
    logits, kept = activations_at(model, tokens, names, pos)
    full_logits, full = model.run_with_cache(tokens, names)
    rows = torch.arange(4)
    torch.testing.assert_close(logits, full_logits[rows, pos])
    for name in names:
        torch.testing.assert_close(kept[name], full[name][rows, pos], msg=name)
    last, kept_last = activations_at(model, tokens, names)
    torch.testing.assert_close(last, full_logits[:, -1])
    torch.testing.assert_close(kept_last["blocks.1.attn.hook_z"], full["blocks.1.attn.hook_z"][:, -1])


@pytest.mark.parametrize("family", list(MODELS))
def test_lens_of_the_final_residual_is_the_output(family):
    model = MODELS[family]
    tokens = torch.randint(0, 96, (3, 9))
    logits, kept = activations_at(model, tokens, ["blocks.1.hook_resid_post"])
    torch.testing.assert_close(lens_logits(model, kept["blocks.1.hook_resid_post"]), logits, rtol=1e-5, atol=1e-5)
    stacked = torch.stack([kept["blocks.1.hook_resid_post"]] * 2, 1)          # any leading shape: [B, 2, d]
    torch.testing.assert_close(lens_logits(model, stacked)[:, 1], logits, rtol=1e-5, atol=1e-5)


def test_activations_at_rejects_heads_first_and_bad_positions():
    model = MODELS["lmcourse"]
    tokens = torch.randint(0, 96, (2, 6))
    with pytest.raises(ValueError, match="heads first"):
        activations_at(model, tokens, ["blocks.0.attn.hook_pattern"])
    with pytest.raises(ValueError, match="one position per row"):
        activations_at(model, tokens, ["blocks.0.hook_resid_pre"], torch.tensor([1, 2, 3]))
    with pytest.raises(KeyError, match="unknown hook point"):
        activations_at(model, tokens, ["blocks.9.hook_resid_pre"])
    with pytest.raises(TypeError, match="HookedHF"):
        activations_at(model.blocks[0], tokens, ["hook_resid_pre"])
