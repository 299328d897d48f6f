"""Tests of `lmcourse.recall`: the data (prompts, noisy facts, the answer metric), the closed-form MLP decomposition
against an independent solve, the intercept's cosine, the logit lens, and the measurements on an lmcourse model and
tiny random-init Hugging Face Llama and GPT-2 models, offline."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import pytest
import torch

from lmcourse.data import knowledge_base
from lmcourse.interp import HookedHF, activations_at, anatomy, direct_logit_attribution
from lmcourse.model import ModelConfig, Transformer
from lmcourse.recall import (analyse_recall, answer_weights, decompose_mlp, fit_mlp_decomposition, layer_inputs,
                             lens_curve, noisy_facts, object_prior, recall_prompts, span_cosine)
from lmcourse.testing import fresh_seed

KB = knowledge_base(n_subjects=10, n_relations=2, n_objects=5, object_zipf=1.0)
V = KB.vocab.vocab_size


def models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    return {"lmcourse": lm.double().eval(), "llama": HookedHF(llama.double().eval()), "gpt2": HookedHF(gpt2.double().eval())}


MODELS = models()


def planted(N=40, H=3, d=16, seed=None):
    g = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    heads = torch.randn(N, H, d, generator=g, dtype=torch.float64)
    resid = torch.randn(N, d, generator=g, dtype=torch.float64)
    w = torch.randn(H, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    return heads, resid, w, b, g


def test_planted_weights_are_recovered():
    heads, resid, w, b, _ = planted()
    fit = fit_mlp_decomposition(heads, resid, torch.einsum("h,nhd->nd", w, heads) - 0.3 * resid + b)
    torch.testing.assert_close(fit.head_weights, w, rtol=0, atol=1e-8)
    assert abs(fit.resid_weight + 0.3) < 1e-8
    torch.testing.assert_close(fit.intercept, b, rtol=0, atol=1e-8)
    assert fit.rel_error < 1e-10


@pytest.mark.parametrize("N,H,d", [(7, 2, 5), (64, 6, 33)])
def test_closed_form_equals_the_full_least_squares(N, H, d):
    heads, resid, _, _, g = planted(N, H, d)
    y = torch.randn(N, d, generator=g, dtype=torch.float64)
    fit = fit_mlp_decomposition(heads, resid, y)
    design = torch.cat([torch.cat([heads, resid[:, None]], 1).permute(0, 2, 1).reshape(N * d, H + 1),
                        torch.eye(d, dtype=torch.float64).repeat(N, 1)], 1)
    sol = torch.linalg.lstsq(design, y.reshape(N * d, 1)).solution[:, 0]
    torch.testing.assert_close(fit.head_weights, sol[:H], rtol=0, atol=1e-9)
    torch.testing.assert_close(fit.intercept, sol[H + 1:], rtol=0, atol=1e-9)
    err = y - torch.einsum("j,njd->nd", sol[:H + 1], torch.cat([heads, resid[:, None]], 1)) - sol[H + 1:]
    assert abs(fit.rel_error - (err.pow(2).sum(-1).mean().sqrt() / y.norm(dim=-1).mean()).item()) < 1e-9


def test_decomposition_bad_input():
    heads, resid, _, _, _ = planted()
    with pytest.raises(ValueError, match="need heads"):
        fit_mlp_decomposition(heads, resid[:, :4], resid)
    with pytest.raises(ValueError, match="two samples"):
        fit_mlp_decomposition(heads[:1], resid[:1], resid[:1])


def test_span_cosine():
    g = torch.Generator().manual_seed(fresh_seed())
    u_from, u_to, other = torch.randn(3, 20, generator=g, dtype=torch.float64)
    assert abs(span_cosine(3 * (u_to - u_from) + 0 * other, u_to, u_from) - 1) < 1e-9
    assert abs(span_cosine(u_from - u_to, u_to, u_from) + 1) < 1e-9


def test_prompts_and_noisy_facts():
    p = recall_prompts(KB, relation=1, template=2)
    assert p.tokens.shape[0] == 10 and (p.tokens[:, p.subject_pos] == torch.tensor(KB.vocab.encode(" ".join(KB.subjects)))).all()
    assert (p.answers == KB.object_ids[1][KB.table[:, 1]]).all()
    with pytest.raises(ValueError, match="out of range"):
        recall_prompts(KB, relation=2)
    b = noisy_facts(KB, 256, torch.Generator().manual_seed(fresh_seed()), noise=0.0)
    picked = b.targets[b.targets != -100]
    assert len(picked) == 256
    assert (picked == KB.object_ids[b.info["relations"], KB.table[b.info["subjects"], b.info["relations"]]]).all()
    flipped = noisy_facts(KB, 3000, torch.Generator().manual_seed(1), noise=1.0)
    freq = torch.bincount(flipped.info["objects"][flipped.info["relations"] == 0], minlength=5).double()
    torch.testing.assert_close(freq / freq.sum(), object_prior(KB)[0], rtol=0, atol=0.05)   # drawn from the prior
    with pytest.raises(ValueError, match="noise"):
        noisy_facts(KB, 4, torch.Generator(), noise=-0.1)


@pytest.mark.parametrize("family", list(MODELS))
def test_lens_and_decomposition_inputs_on_models(family):
    model = MODELS[family]
    p = recall_prompts(KB)
    curve = lens_curve(model, p.tokens, p.answers)
    own = model(p.tokens)[0][:, -1].float().softmax(-1).gather(1, p.answers[:, None]).mean().item()
    assert abs(curve["p_answer"][-1] - own) < 1e-6 and len(curve["stages"]) == 5
    heads, resid, mlp = layer_inputs(model, p.tokens, 1)
    b_o = anatomy(model).b_o(1)
    _, acts = activations_at(model, p.tokens, ["blocks.1.hook_resid_post"])
    total = resid + heads.sum(1) + (b_o if b_o is not None else 0) + mlp
    torch.testing.assert_close(total, acts["blocks.1.hook_resid_post"], rtol=0, atol=1e-9)
    fit = decompose_mlp(model, p.tokens, 1)
    assert fit.head_weights.shape == (4,) and fit.intercept.shape == (32,) and fit.rel_error >= 0
    with pytest.raises(ValueError, match="layer"):
        layer_inputs(model, p.tokens, 2)
    attr = direct_logit_attribution(model, p.tokens, answer_weights(p.answers, p.candidates, V))
    torch.testing.assert_close(attr.total(), attr.metric, rtol=0, atol=1e-6)


def test_analyse_recall_runs_and_is_consistent():
    model = MODELS["lmcourse"]
    r = analyse_recall(model, KB, relation=0)
    assert len(r["head_effect"]) == 2 and len(r["head_effect"][0]) == 4 and len(r["layers"]) == 2
    l, h = r["top_head"]
    assert r["head_effect"][l][h] == min(min(row) for row in r["head_effect"])
    assert all(0 <= a <= 1 for row in r["attention_to_subject"] for a in row)
    assert 0 <= r["accuracy"] <= 1
