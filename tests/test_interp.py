"""Tests of `lmcourse.interp`: anatomy, metrics, per-head outputs, direct logit attribution (completeness), path
patching (what is frozen, what is recomputed, receivers, stacked experiments) and `HookedHF`, on lmcourse models and
tiny random-init Hugging Face Llama (grouped-query) and GPT-2 models, offline."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import pytest
import torch
import torch.nn as nn

from lmcourse.interp import (HookedHF, NoMLP, PathPatching, all_heads, anatomy, difference_weights, direct_logit_attribution,
                             head_outputs, logit_difference, logit_minus_mean, minus_mean_weights, path_patch,
                             path_patching_scores, read_directions)
from lmcourse.model import ModelConfig, Transformer, patch
from lmcourse.testing import fresh_seed

V = 64


def lm_model(n_kv_heads=2, n_layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=64)
    return Transformer(cfg, **kw).double().eval().requires_grad_(False)


def randomise_1d(model):
    "Random biases and norm gains, so that nothing in the checks is trivially 0 or 1."
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"): p.normal_(0, 0.1)
            elif p.dim() == 1: p.uniform_(0.5, 1.5)
    return model


def hf_model(family, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    if family == "llama":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    return randomise_1d(m.eval().requires_grad_(False))


def data(vocab=V, B=3, T=12, seed=None):
    g = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    return (torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B,), generator=g),
            torch.randint(0, T, (B,), generator=g))


# -- anatomy and metrics --------------------------------------------------------------------------------------
def test_anatomy_of_each_family_and_w_o_is_a_view():
    model = lm_model()
    a = anatomy(model)
    assert (a.family, a.n_heads, a.n_kv_heads, a.head_dim, a.norm_kind) == ("lmcourse", 4, 2, 16, "rms")
    assert a.w_o(1).data_ptr() == model.blocks[1].attn.o_proj.weight.data_ptr()
    for family, kind in (("llama", "rms"), ("gpt2", "layer")):
        hf = hf_model(family)
        a = anatomy(hf)
        assert (a.family, a.n_layers, a.n_heads, a.head_dim, a.norm_kind) == (family, 2, 4, 16, kind)
        assert a.w_o(0).shape == (64, 64)
        before = a.w_o(0)[:, 5].clone()
        with torch.no_grad(): a.w_o(0)[:, 5].mul_(3)            # editing the view edits the model
        assert torch.equal(a.out_proj[0].weight.reshape(-1).abs().sum() > 0, torch.tensor(True))
        assert torch.allclose(a.w_o(0)[:, 5], 3 * before)
    with pytest.raises(TypeError, match="neither an lmcourse Transformer"):
        anatomy(nn.Linear(2, 2))


def test_metrics_are_logit_weights():
    logits = torch.randn(4, 7, V, dtype=torch.float64)
    t, o, pos = torch.randint(0, V, (4,)), torch.randint(0, V, (4,)), torch.tensor([0, 6, 3, 2])
    at = logits[torch.arange(4), pos].float()
    assert torch.allclose(logit_minus_mean(logits, t, pos), (at * minus_mean_weights(t, V)).sum(-1), atol=1e-5)
    assert torch.allclose(logit_difference(logits, t, o, pos), (at * difference_weights(t, o, V)).sum(-1), atol=1e-5)
    assert torch.allclose(logit_minus_mean(logits, t), logits[:, -1].float().gather(1, t[:, None])[:, 0]
                          - logits[:, -1].float().mean(-1))
    with pytest.raises(ValueError, match="one position per row"):
        logit_minus_mean(logits, t, pos[:3])


# -- per-head outputs and attribution ------------------------------------------------------------------------
def test_head_outputs_add_up_to_the_attention_output():
    model = lm_model()
    tokens, _, pos = data()
    heads = head_outputs(model, tokens, pos)
    _, acts = model.run_with_cache(tokens, [f"blocks.{l}.hook_attn_out" for l in range(2)])
    for l in range(2):
        assert torch.allclose(heads[:, l].sum(1), acts[f"blocks.{l}.hook_attn_out"][torch.arange(3), pos], atol=1e-12)
    gpt2 = HookedHF(hf_model("gpt2"))
    heads = head_outputs(gpt2, tokens, pos)
    _, acts = gpt2.run_with_cache(tokens, ["blocks.1.hook_attn_out"])
    b_o = anatomy(gpt2).b_o(1)                                         # GPT-2's shared output bias
    assert torch.allclose(heads[:, 1].sum(1) + b_o, acts["blocks.1.hook_attn_out"][torch.arange(3), pos], atol=1e-5)


@pytest.mark.parametrize("which", ["lmcourse-mha", "lmcourse-gqa", "llama", "gpt2"])
def test_attribution_is_complete(which):
    if which.startswith("lmcourse"):
        model, vocab = lm_model(n_kv_heads=4 if which.endswith("mha") else 2), V
        tol = 1e-6                                       # the engine's RMSNorm computes in float32
    else:
        model, vocab, tol = HookedHF(hf_model(which)), 128, 2e-5
    tokens, targets, pos = data(vocab)
    attr = direct_logit_attribution(model, tokens, minus_mean_weights(targets, vocab), pos)
    assert torch.allclose(attr.total(), attr.metric, atol=tol), (attr.total(), attr.metric)
    logits = model(tokens)[0]
    assert torch.allclose(attr.metric.float(), logit_minus_mean(logits, targets, pos), atol=tol)
    assert attr.heads.abs().sum() > 0 and attr.mlps.abs().sum() > 0
    if which == "gpt2":
        assert attr.attn_bias.abs().sum() > 0 and attr.bias.abs().sum() > 0


def test_read_direction_of_layernorm_is_centred():
    gpt2 = hf_model("gpt2")
    r = read_directions(gpt2, minus_mean_weights(torch.tensor([3, 9]), 128), torch.full((2, 1), 2.0))
    assert torch.allclose(r.sum(-1), torch.zeros(2), atol=1e-5)


# -- path patching ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["lmcourse", "llama", "gpt2"])
def test_nothing_patched_is_the_clean_run_bit_for_bit(which):
    model = lm_model() if which == "lmcourse" else HookedHF(hf_model(which))
    tokens, _, pos = data(128 if which != "lmcourse" else V)
    clean = model(tokens)[0]
    assert torch.equal(path_patch(model, tokens, [], positions=pos), clean)
    # replacing a sender by its own value (ablation="source" with the same tokens) changes nothing either
    assert torch.equal(path_patch(model, tokens, [(0, 1), (1, None)], ablation="source", positions=pos), clean)


def test_stacked_experiments_equal_one_at_a_time_and_final_receiver():
    model = lm_model()
    tokens, targets, pos = data()
    metric = lambda lg: logit_minus_mean(lg, targets, pos)
    pp = PathPatching(model, tokens, positions=pos)
    stacked = pp.scores(metric, chunk=5)                               # chunks of 5 and 3 over 8 heads
    single = torch.stack([pp.scores(metric, [s])[0] for s in all_heads(model)])
    assert torch.allclose(stacked, single, atol=1e-10)
    assert stacked.abs().min() > 0
    one = path_patch(model, tokens, [(0, 2)], positions=pos)
    received = path_patch(model, tokens, [(0, 2)], positions=pos, receivers=[("blocks.1.hook_resid_post", None)])
    rows = torch.arange(3)
    assert torch.allclose(received[rows, pos], one[rows, pos], atol=1e-12)


@pytest.mark.parametrize("which", ["lmcourse", "gpt2"])
def test_fully_frozen_path_patching_is_the_direct_effect(which):
    "MLPs and the final norm's scale frozen: the effect of ablating a head is exactly (mu - z) W_O^T r."
    model, vocab = (lm_model(), V) if which == "lmcourse" else (HookedHF(hf_model("gpt2")), 128)
    tokens, targets, pos = data(vocab)
    a = anatomy(model)
    metric = lambda lg: logit_minus_mean(lg, targets, pos)
    clean_logits, acts = model.run_with_cache(tokens, ["norm.hook_scale"] + [f"blocks.{l}.attn.hook_z" for l in range(2)])
    rows = torch.arange(3)
    r = read_directions(model, minus_mean_weights(targets, vocab), acts["norm.hook_scale"][rows, pos])
    for layer in range(2):
        z = acts[f"blocks.{layer}.attn.hook_z"]
        dz = (z.mean(0, keepdim=True) - z)[rows, pos].to(r.dtype)                    # [B, H, D]
        direct = torch.einsum("bhe,dhe,bd->bh", dz, a.w_o(layer).to(r.dtype).view(64, 4, 16), r)
        for head in range(4):
            with patch(model, {"norm.hook_scale": acts["norm.hook_scale"]}):
                patched = path_patch(model, tokens, [(layer, head)], positions=pos, freeze_mlps=True)
            assert torch.allclose(metric(patched) - metric(clean_logits), direct[:, head].float(), atol=2e-5)


def mean_ablation(mean, pos, head):
    "hook_z edit: head `head`'s z at row b's position pos[b] replaced by its batch mean (`mean` [1, T, H, D])."
    def ablate(z):
        z = z.clone()
        z[torch.arange(len(pos)), pos, head] = mean[0, pos, head]
        return z
    return ablate


def test_path_patching_in_a_one_layer_attention_only_model_is_activation_patching():
    model = lm_model(n_layers=1, ffn=lambda c, l: NoMLP())
    tokens, _, pos = data()
    _, acts = model.run_with_cache(tokens, ["blocks.0.attn.hook_z"])
    mean = acts["blocks.0.attn.hook_z"].mean(0, keepdim=True)
    ablate = mean_ablation(mean, pos, head=1)
    with patch(model, {"blocks.0.attn.hook_z": ablate}):
        expected = model(tokens)[0]
    assert torch.allclose(path_patch(model, tokens, [(0, 1)], positions=pos), expected, atol=1e-12)


def test_frozen_heads_block_indirect_paths_and_receivers_open_them():
    "Ablating a layer-0 head in an attention-only model reaches layer 1 only through a receiver."
    model = lm_model(ffn=lambda c, l: NoMLP())
    tokens, targets, pos = data()
    _, acts = model.run_with_cache(tokens, ["blocks.0.attn.hook_z"])
    mean = acts["blocks.0.attn.hook_z"].mean(0, keepdim=True)
    ablate = mean_ablation(mean, pos, head=0)
    # direct path only: the same as ablating the head while every later head reads its clean input
    _, clean = model.run_with_cache(tokens, ["blocks.1.attn.hook_z"])
    with patch(model, {"blocks.0.attn.hook_z": ablate, "blocks.1.attn.hook_z": clean["blocks.1.attn.hook_z"]}):
        direct_only = model(tokens)[0]
    assert torch.allclose(path_patch(model, tokens, [(0, 0)], positions=pos), direct_only, atol=1e-12)
    # the path through the values of layer-1 kv head 1 only: a clean run with those values replaced
    with patch(model, {"blocks.0.attn.hook_z": ablate}):
        _, changed = model.run_with_cache(tokens, ["blocks.1.attn.hook_v"])
    def values_of_kv_head_1(v):
        v = v.clone()
        v[torch.arange(3), 1, pos] = changed["blocks.1.attn.hook_v"][torch.arange(3), 1, pos]
        return v
    with patch(model, {"blocks.1.attn.hook_v": values_of_kv_head_1}):
        expected = model(tokens)[0]
    got = path_patch(model, tokens, [(0, 0)], positions=pos, receivers=[("blocks.1.attn.hook_v", 1)])
    assert torch.allclose(got, expected, atol=1e-12)
    assert not torch.allclose(got, model(tokens)[0])


def test_mean_over_another_batch_and_mlp_senders():
    model = lm_model()
    tokens, _, pos = data()
    same_row = tokens[:1].repeat(3, 1)                   # the mean over this batch is row 0's own activations
    patched = path_patch(model, tokens, [(0, 3), (1, None)], positions=pos, source=same_row)
    clean = model(tokens)[0]
    assert torch.allclose(patched[0], clean[0], atol=1e-12)
    assert not torch.allclose(patched[1:], clean[1:])


def test_path_patching_errors():
    model = lm_model()
    tokens, _, pos = data()
    with pytest.raises(ValueError, match="within 2 layers"):
        path_patch(model, tokens, [(0, 4)])
    with pytest.raises(ValueError, match="within 2 layers"):
        path_patch(model, tokens, [0])
    with pytest.raises(ValueError, match="ablation must be"):
        path_patch(model, tokens, [], ablation="zero")
    with pytest.raises(ValueError, match="does not fit tokens"):
        path_patch(model, tokens, [], source=tokens[:, :5])
    with pytest.raises(ValueError, match="one position per row"):
        path_patch(model, tokens, [], positions=pos[:2])
    with pytest.raises(KeyError, match="unknown receiver"):
        path_patch(model, tokens, [], receivers=[("blocks.1.attn.hook_zz", 0)])
    with pytest.raises(TypeError, match="HookedHF"):
        path_patching_scores(hf_model("llama"), tokens, lambda lg: lg[:, -1, 0])


# -- HookedHF ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hooked_hf_is_transparent_and_removable(family):
    hf = hf_model(family)
    tokens, _, _ = data(128)
    plain = hf(tokens).logits
    hooked = HookedHF(hf)
    assert torch.equal(hooked(tokens)[0], plain)
    logits, acts = hooked.run_with_cache(tokens)
    assert torch.equal(logits, plain)
    kv = 2 if family == "llama" else 4
    assert acts["blocks.1.attn.hook_k_pre"].shape == (3, kv, 12, 16)
    assert acts["blocks.1.attn.hook_z"].shape == (3, 12, 4, 16)
    assert acts["norm.hook_scale"].shape == (3, 12, 1)
    hidden = hf(tokens, output_hidden_states=True).hidden_states            # embeddings, then each layer's output
    assert torch.equal(acts["blocks.0.hook_resid_pre"], hidden[0]) and torch.equal(acts["blocks.0.hook_resid_post"], hidden[1])
    # an edit through the hook points changes the output; removing the hooks restores it
    with patch(hooked, {"blocks.0.attn.hook_v": lambda v: 2 * v}):
        assert not torch.allclose(hooked(tokens)[0], plain)
    loss = hooked(tokens, tokens)[1]
    assert loss.ndim == 0 and torch.isfinite(loss)
    hooked.remove_hooks()
    with patch(hooked, {"blocks.0.attn.hook_v": lambda v: 2 * v}):
        assert torch.equal(hf(tokens).logits, plain)   # the wrapped model no longer routes through the hook points
    with pytest.raises(TypeError, match="already has the engine's hook points"):
        HookedHF(lm_model())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hooked_hf_norm_scale_replacement_recomputes_the_norm(family):
    hooked = HookedHF(hf_model(family))
    a = anatomy(hooked)
    tokens, _, _ = data(128)
    _, acts = hooked.run_with_cache(tokens, ["norm.hook_scale", "blocks.1.hook_resid_post"])
    x, s = acts["blocks.1.hook_resid_post"], acts["norm.hook_scale"]
    assert torch.allclose(a.norm_scale(x), s)
    with patch(hooked, {"norm.hook_scale": 2 * s}):
        doubled = hooked(tokens)[0]
    y = a.norm_linear(x, 2 * s)
    if a.norm_bias() is not None: y = y + a.norm_bias()
    assert torch.allclose(doubled, a.unembed(y), atol=1e-5)


def test_hooked_hf_head_scaling_equals_scaling_w_o_columns():
    for family in ("llama", "gpt2"):
        hf = hf_model(family)
        hooked = HookedHF(hf)
        tokens, _, _ = data(128)
        tau = torch.tensor([0.2, 1.0, 1.7, 0.5])
        with patch(hooked, {"blocks.0.attn.hook_z": lambda z: z * tau[:, None]}):
            scaled = hooked(tokens)[0]
        with torch.no_grad():
            anatomy(hf).w_o(0).mul_(tau.repeat_interleave(16))
        assert torch.allclose(hooked(tokens)[0], scaled, atol=1e-5)
