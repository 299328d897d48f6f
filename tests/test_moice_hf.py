"""The MoICE `transformers` integration, offline on a tiny randomly initialised Llama."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import pytest
import torch

from lmcourse.moice import (PAPER_BASES, MoICELlamaAttention, apply_moice, moice_layers, router_param_count,
                            set_fixed_gates)
from lmcourse.testing import assert_close

transformers = pytest.importorskip("transformers")


def _tiny_llama(**kw):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_one_hot_gates_reproduce_the_greedy_output():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 14))
    mask = torch.ones_like(ids)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    with torch.no_grad():
        plain_logits = model(ids).logits
    mixers = apply_moice(model, PAPER_BASES[:3])
    assert len(mixers) == 2 and all(isinstance(layer.self_attn, MoICELlamaAttention) for layer in model.model.layers)
    set_fixed_gates(model, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False), plain)
    with torch.no_grad():
        assert_close(model(ids).logits, plain_logits, 1e-5)
    set_fixed_gates(model, None)
    with torch.no_grad():
        assert (model(ids).logits - plain_logits).abs().max() > 1e-5              # the routers mix other bases in


def test_only_routers_train_and_gradients_reach_every_layer():
    model = _tiny_llama()
    apply_moice(model, PAPER_BASES[:4], top_k=2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == router_param_count(2, 16, 4)
    ids = torch.randint(0, 128, (2, 20))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(m.router_logits.shape == (2, 4, 20, 4) for m in moice_layers(model))


def test_kernel_backend_matches_reference_backend():
    model = _tiny_llama()
    apply_moice(model, PAPER_BASES[:3])
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        ref = model(ids).logits
        for m in moice_layers(model): m.backend = "triton"
        assert_close(model(ids).logits, ref, 1e-4)


def test_refusals():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="own RoPE base"):
        apply_moice(model, [20_000.0, 10_000.0])
    apply_moice(model, PAPER_BASES[:2])
    with pytest.raises(ValueError, match="already"):
        apply_moice(model, PAPER_BASES[:2])
    ids = torch.randint(0, 128, (2, 10))
    with pytest.raises(NotImplementedError, match="unpadded"):
        model(ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0))
    scaled = _tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10_000.0})
    with pytest.raises(NotImplementedError, match="rope_type"):
        apply_moice(scaled)


def test_default_bases_start_with_the_models_base():
    model = _tiny_llama(rope_parameters={"rope_type": "default", "rope_theta": 50_000.0})
    mixers = apply_moice(model, n_experts=4)
    assert mixers[0].bases[0] == 50_000.0 and len(mixers[0].bases) == 4
