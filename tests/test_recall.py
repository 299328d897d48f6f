"""Tests of `lmcourse.recall`: the data (prompts, noisy facts, the answer metric), the closed-form MLP decomposition
against an independent solve, the intercept's cosine, the logit lens, the measurements on an lmcourse model and
tiny random-init Hugging Face Llama and GPT-2 models, offline; the heads' characterisation (attention weights, OV
scores, Pearson r) and the final layer's mitigations against computations by hand in float64; the GPT-2 head ranking
from weights saved to a temporary directory (never a download); and the two Triton kernels (head attribution, the
decomposition's moments) against float64 references at the interpreter's and the GPU's tiles."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import pytest
import torch

from lmcourse.data import knowledge_base
from lmcourse.interp import HookedHF, activations_at, anatomy, direct_logit_attribution
from lmcourse.model import ModelConfig, Transformer
from lmcourse.interp import PathPatching, minus_mean_weights
from lmcourse.recall import (CAPITALS, MAX_HEAD_DIM, MAX_MOMENT_INPUTS, analyse_recall, answer_weights, attention_to,
                             attention_writes, capital_prompts, compile_cases, decompose_mlp, decomposition_moments,
                             decomposition_moments_ref, final_layer_mitigations, fit_mlp_decomposition, head_attribution,
                             head_attribution_ref, head_attribution_simple, head_logit_attribution, layer_inputs,
                             lens_curve, load_local_model, noisy_facts, object_prior, ov_scores, pearson, rank_heads_hf,
                             recall_experiment_config, recall_prompts, span_cosine, train_recall_model)
from lmcourse.testing import (LaunchError, assert_close, capture_launches, fresh_seed, gpu_tiles, kernel_device,
                              kernel_dtypes, poisoned_outputs, random_tensors, tolerance)

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


# --- what heads move: attention weights, OV scores, Pearson r; the final layer's mitigations --------------------------
def _layers(family, model):
    "The wrapped model's decoder layers."
    return model.blocks if family == "lmcourse" else model.model.model.layers if family == "llama" else model.model.transformer.h


def _value_and_out_by_hand(family, model, l, x):
    """By hand from the weights, in float64: (v [..., Hkv·D] of layer l for residuals x [..., d], W_O [d, H·D],
    a function o -> logits through the final norm and unembedding)."""
    layer = _layers(family, model)[l]
    if family == "lmcourse":
        return layer.attn.v_proj(layer.attn_norm(x)), layer.attn.o_proj.weight, lambda o: model.lm_head(model.norm(o))
    if family == "llama":
        lm = model.model
        return layer.self_attn.v_proj(layer.input_layernorm(x)), layer.self_attn.o_proj.weight, lambda o: lm.lm_head(lm.model.norm(o))
    lm, d = model.model, x.shape[-1]
    v = (layer.ln_1(x) @ layer.attn.c_attn.weight + layer.attn.c_attn.bias)[..., 2 * d:]           # Conv1D: x W + b
    return v, layer.attn.c_proj.weight.T, lambda o: lm.lm_head(lm.transformer.ln_f(o))


def _patterns(family, model, tokens):
    "[B, L, H, T, T] attention patterns, materialised: the engine's `hook_pattern`, or HF's eager attention."
    if family == "lmcourse":
        _, cache = model.run_with_cache(tokens, [f"blocks.{l}.attn.hook_pattern" for l in range(2)])
        return torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(2)], 1)
    hf = model.model
    hf.set_attn_implementation("eager")
    try:
        return torch.stack(hf(tokens, output_attentions=True).attentions, 1).detach()
    finally:
        hf.set_attn_implementation("sdpa")


@pytest.mark.parametrize("family", list(MODELS))
def test_attention_to_equals_the_materialised_pattern(family):
    model = MODELS[family]
    p = recall_prompts(KB)
    key = torch.randint(0, p.tokens.shape[1], (p.tokens.shape[0],), generator=torch.Generator().manual_seed(fresh_seed()))
    before = model(p.tokens)[0]
    got = attention_to(model, p.tokens, key)
    pattern = _patterns(family, model, p.tokens)[torch.arange(len(key)), :, :, -1, key]             # [B, L, H]
    torch.testing.assert_close(got, pattern.to(got.dtype), rtol=0, atol=1e-6)                       # lmcourse's pattern softmax is float32
    torch.testing.assert_close(model(p.tokens)[0], before, rtol=0, atol=0)                           # no edit left behind
    torch.testing.assert_close(attention_to(model, p.tokens, 2), _patterns(family, model, p.tokens)[:, :, :, -1, 2].to(got.dtype), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="key_pos"):
        attention_to(model, p.tokens, p.tokens.shape[1])


@pytest.mark.parametrize("family", list(MODELS))
def test_ov_scores_equal_a_float64_computation_by_hand(family):
    model = MODELS[family]
    p = recall_prompts(KB)
    s, B, H = p.subject_pos, p.tokens.shape[0], 4
    got = ov_scores(model, p.tokens, s, p.answers, p.candidates, k=3)
    _, cache = model.run_with_cache(p.tokens, [f"blocks.{l}.hook_resid_pre" for l in range(2)])
    subjects = p.tokens[:, s]
    for l in range(2):
        with torch.no_grad():
            v, w_o, readout = _value_and_out_by_hand(family, model, l, cache[f"blocks.{l}.hook_resid_pre"][:, s])
            v = v.view(B, -1, 8).repeat_interleave(H // (v.shape[-1] // 8), 1)                           # [B, H, D]
            logits = readout(torch.einsum("bhe,dhe->bhd", v, w_o.view(-1, H, 8)))                        # [B, H, V]
        torch.testing.assert_close(got.copy[l], (logits.topk(3, -1).indices == subjects[:, None, None]).any(-1).float().mean(0))
        torch.testing.assert_close(got.subject_logit[l], logits[torch.arange(B), :, subjects].float().mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(got.answer_logit[l], logits[torch.arange(B), :, p.answers].float().mean(0), rtol=0, atol=1e-6)
        leader = p.candidates[logits[..., p.candidates].argmax(-1)]
        torch.testing.assert_close(got.answer_first[l], (leader == p.answers[:, None]).float().mean(0))
    negative = ov_scores(model, p.tokens, s, k=3, sign=-1.0)
    torch.testing.assert_close(negative.subject_logit, -got.subject_logit, rtol=1e-5, atol=1e-6)     # lens of −o: the norm is odd
    assert negative.answer_logit is None and got.copy.shape == (2, 4)


def test_an_identity_ov_circuit_copies_and_its_negation_does_not():
    torch.manual_seed(fresh_seed())
    model = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=1, max_seq_len=32)).double().eval()
    with torch.no_grad():
        model.blocks[0].attn.v_proj.weight.copy_(torch.eye(32)); model.blocks[0].attn.o_proj.weight.copy_(torch.eye(32))
    p = recall_prompts(KB)
    assert ov_scores(model, p.tokens, p.subject_pos, k=1).copy.item() == 1.0    # its output is the subject's embedding (tied)
    assert ov_scores(model, p.tokens, p.subject_pos, k=1, sign=-1).copy.item() == 0.0


def test_pearson():
    g = torch.Generator().manual_seed(fresh_seed())
    x, noise = torch.randn(2, 50, 3, 2, generator=g, dtype=torch.float64)
    y = 0.5 * x + noise
    expected = torch.stack([torch.corrcoef(torch.stack([x[:, i, j], y[:, i, j]]))[0, 1] for i in range(3) for j in range(2)]).view(3, 2)
    torch.testing.assert_close(pearson(x, y), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(pearson(x, -3 * x + 2), -torch.ones(3, 2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert pearson(torch.ones(5), torch.randn(5, generator=g)).isnan()


@pytest.mark.parametrize("family", list(MODELS))
def test_attention_writes_by_hand(family):
    model = MODELS[family]
    p = recall_prompts(KB)
    got = attention_writes(model, p.tokens, p.subject_pos, targets=p.answers)
    _, cache = model.run_with_cache(p.tokens, [f"blocks.{l}.attn.hook_z" for l in range(2)])
    W_U = model.lm_head.weight if family == "lmcourse" else model.model.lm_head.weight
    for l in range(2):
        _, w_o, _ = _value_and_out_by_hand(family, model, l, torch.zeros(1, 32, dtype=torch.float64))
        writes = torch.einsum("bhe,dhe,bd->bh", cache[f"blocks.{l}.attn.hook_z"][:, -1], w_o.view(32, 4, 8), W_U[p.answers]).detach()
        torch.testing.assert_close(got.writes[:, l], writes, rtol=1e-9, atol=0)
        for h in range(4):
            r = torch.corrcoef(torch.stack([got.attention[:, l, h].double(), writes[:, h]]))[0, 1]
            torch.testing.assert_close(got.pearson[l, h], r, rtol=0, atol=1e-9)
    torch.testing.assert_close(got.attention, attention_to(model, p.tokens, p.subject_pos))


@pytest.mark.parametrize("family", list(MODELS))
def test_final_layer_mitigations_by_hand(family):
    """The self-only final layer recomputed by hand from the residual entering it: values straight into W_O (each
    position attends only to itself), then the MLP; the refitted intercept from the per-head outputs of that layer."""
    model = MODELS[family]
    p = recall_prompts(KB)
    got = final_layer_mitigations(model, p.tokens, p.answers)
    curve = lens_curve(model, p.tokens, p.answers)
    assert abs(got["output"]["p_answer"] - curve["p_answer"][-1]) < 1e-9 and abs(got["mid"]["p_answer"] - curve["p_answer"][-2]) < 1e-9
    _, cache = model.run_with_cache(p.tokens, ["blocks.1.hook_resid_pre"])
    x = cache["blocks.1.hook_resid_pre"]
    B, T, _ = x.shape
    layer = _layers(family, model)[1]
    with torch.no_grad():
        v, w_o, readout = _value_and_out_by_hand(family, model, 1, x)
        v = v.view(B, T, -1, 8).repeat_interleave(4 // (v.shape[-1] // 8), 2)                           # [B, T, H, D]
        heads = torch.einsum("bthe,dhe->bthd", v, w_o.view(32, 4, 8))[:, -1]                            # [B, H, d] at END
        b_o = layer.attn.c_proj.bias if family == "gpt2" else 0
        mid = x + torch.einsum("bthe,dhe->btd", v, w_o.view(32, 4, 8)) + b_o
        mlp = {"lmcourse": lambda h: layer.ffn(layer.ffn_norm(h)), "llama": lambda h: layer.mlp(layer.post_attention_layernorm(h)),
               "gpt2": lambda h: layer.mlp(layer.ln_2(h))}[family](mid)
        b = fit_mlp_decomposition(heads, x[:, -1], mlp[:, -1]).intercept
        for name, y in (("self_only_mid", mid[:, -1]), ("self_only_output", (mid + mlp)[:, -1]),
                        ("self_only_output_minus_b", (mid + mlp)[:, -1] - b)):
            logp = readout(y).float().log_softmax(-1)
            assert abs(got[name]["p_answer"] - logp[torch.arange(B), p.answers].exp().mean().item()) < 1e-6, name
            assert abs(got[name]["entropy"] + (logp.exp() * logp).sum(-1).mean().item()) < 1e-5, name


def test_subtracting_the_intercept_of_a_constant_final_mlp_undoes_it():
    "A final MLP that adds only a constant c: its decomposition's intercept is c, and subtracting it gives back `mid`."
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(fresh_seed())
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0))
    mlp = hf.transformer.h[1].mlp
    with torch.no_grad():
        mlp.c_fc.weight.zero_(); mlp.c_proj.weight.zero_(); mlp.c_proj.bias.normal_(0, 3.0)
        hf.lm_head.weight.mul_(50)                                    # logits of order 1, not 0.02 (tied: the embedding too)
    model = HookedHF(hf.double().eval())
    p = recall_prompts(KB)
    got = final_layer_mitigations(model, p.tokens, p.answers)
    for key in ("p_answer", "entropy", "p_top"):
        assert abs(got["output_minus_b"][key] - got["mid"][key]) < 1e-6, key
    assert abs(got["output"]["entropy"] - got["mid"]["entropy"]) > 1e-3                            # the constant did move it
    model.remove_hooks()


@pytest.fixture(scope="module")
def trained():
    "The smoke experiment's model trained with seed 1 (the notebook runs seed 0), analysed on both relations."
    model, kb, _ = train_recall_model(recall_experiment_config(), seed=1, device="cpu")
    return model, kb, [analyse_recall(model, kb, r) for r in range(len(kb.relations))]


def test_on_the_trained_model_the_mover_carries_the_answer_and_the_mitigations_lower_it(trained):
    """What held in seeds 0-4 while writing (nbs/08_recall.ipynb, smoke): the top head's OV circuit puts the answer first
    among the relation's objects for >= 60 % of subjects on average (chance 1/16), and both mitigations lower
    P(answer), since this final layer raises it."""
    model, kb, relations = trained
    first = [r["ov_answer_first"][r["top_head"][0]][r["top_head"][1]] for r in relations]
    assert sum(first) / len(first) >= 0.6, first
    for r in relations:
        f = r["final_layer"]
        assert f["output"]["p_answer"] > f["mid"]["p_answer"], f                                    # no anti-overconfidence here
        assert f["output_minus_b"]["p_answer"] < f["output"]["p_answer"] and f["self_only_output"]["p_answer"] < f["output"]["p_answer"], f
        p = recall_prompts(kb, kb.relations.index(r["relation"]))
        _, cache = model.run_with_cache(p.tokens, [f"blocks.{l}.attn.hook_pattern" for l in range(2)])
        pattern = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][:, :, -1, p.subject_pos].mean(0) for l in range(2)])
        torch.testing.assert_close(torch.tensor(r["attention_to_subject"]), pattern, rtol=0, atol=1e-5)


# --- GPT-2's head ranking from local weights ------------------------------------------------------------------------
def _save_tiny_gpt2(path, with_tokenizer=False):
    "A random-init GPT-2 (96-token vocabulary) saved with save_pretrained; optionally a character-level GPT-2 tokenizer."
    import json
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(path)
    if with_tokenizer:
        chars = ["<|endoftext|>", "Ġ"] + [chr(c) for c in range(33, 127)]                                   # 'Ġ': GPT-2's space
        (path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(chars)}))
        (path / "merges.txt").write_text("#version: 0.2\n")
        GPT2Tokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    return path


@pytest.fixture
def no_network(monkeypatch):
    "Any attempt to open a connection is recorded (and refused)."
    import socket
    attempts = []
    def refuse(self, *args):
        attempts.append(args)
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_rank_heads_hf_from_a_saved_model_equals_path_patching(tmp_path, monkeypatch, no_network):
    from transformers import GPT2LMHeadModel
    path = _save_tiny_gpt2(tmp_path)
    p = recall_prompts(KB)
    assert V <= 96
    got = rank_heads_hf(str(path), p.tokens, p.answers, chunk=3)
    hooked = HookedHF(GPT2LMHeadModel.from_pretrained(path).eval())
    B, T = p.tokens.shape
    c = minus_mean_weights(p.answers, 96)
    score = lambda logits: (logits[:, -1].float() * c).sum(-1)
    expected = PathPatching(hooked, p.tokens, positions=torch.full((B,), T - 1)).scores(score).view(2, 4)
    torch.testing.assert_close(got.effect, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.attribution, direct_logit_attribution(hooked, p.tokens, c).heads.mean(0), rtol=0, atol=1e-6)
    assert [got.effect[l, h].item() for l, h in got.order] == sorted(got.effect.flatten().tolist()) and got.n_prompts == B
    assert got.top(2) == [(l, h, round(got.effect[l, h].item(), 4)) for l, h in got.order[:2]]
    objects = rank_heads_hf(str(path), p.tokens, p.answers, metric="objects")
    c = answer_weights(p.answers, p.answers.unique(), 96)
    score = lambda logits: (logits[:, -1].float() * c).sum(-1)
    expected = PathPatching(hooked, p.tokens, positions=torch.full((B,), T - 1)).scores(score).view(2, 4)
    torch.testing.assert_close(objects.effect, expected, rtol=0, atol=1e-6)
    monkeypatch.setenv("LMCOURSE_GPT2_PATH", str(path))
    torch.testing.assert_close(rank_heads_hf(None, p.tokens, p.answers).effect, got.effect, rtol=0, atol=0)
    assert not no_network


def test_rank_heads_hf_on_a_model_object_leaves_it_unhooked():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)).eval()
    p = recall_prompts(KB)
    before = llama(p.tokens).logits
    ranking = rank_heads_hf(llama, p.tokens, p.answers)
    assert ranking.effect.shape == (2, 4) and torch.isfinite(ranking.effect).all()
    hooked = HookedHF(llama)                                                        # given a HookedHF, it keeps it hooked
    torch.testing.assert_close(rank_heads_hf(hooked, p.tokens, p.answers).effect, ranking.effect, rtol=0, atol=0)
    assert any(m._forward_hooks for m in llama.modules())
    hooked.remove_hooks()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llama.modules())
    torch.testing.assert_close(llama(p.tokens).logits, before, rtol=0, atol=0)


def test_capital_prompts_with_the_saved_tokenizer(tmp_path, no_network):
    path = _save_tiny_gpt2(tmp_path, with_tokenizer=True)
    model, tokenizer = load_local_model(path)
    assert tokenizer is not None and model.config.n_layer == 2
    tokens, answers, kept = capital_prompts(tokenizer)
    five = [c for c in CAPITALS if len(c) == 5]                       # one character a token: the most common length, 5
    assert kept == five and tokens.shape == (5, len("The capital of Italy is"))
    assert [tokenizer.decode(t) for t in tokens] == [f"The capital of {c} is" for c in five]
    assert (answers == tokenizer(" ")["input_ids"][0]).all()           # the first token of ' Rome' is its space here
    ranking = rank_heads_hf(str(path))
    assert ranking.n_prompts == 5 and ranking.effect.shape == (2, 4)
    torch.testing.assert_close(ranking.effect, rank_heads_hf(model, tokens, answers).effect, rtol=0, atol=0)
    assert not no_network


def test_rank_heads_hf_errors_and_never_downloads(tmp_path, monkeypatch, no_network):
    import lmcourse.recall as recall
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_local_model(tmp_path / "absent")
    monkeypatch.setenv("LMCOURSE_GPT2_PATH", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="LMCOURSE_GPT2_PATH="):
        rank_heads_hf()
    monkeypatch.delenv("LMCOURSE_GPT2_PATH")
    monkeypatch.setattr(recall, "GPT2_HUB_IDS", ("lmcourse-tests/not-a-cached-model",))
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        rank_heads_hf()
    path = _save_tiny_gpt2(tmp_path / "weights")
    with pytest.raises(ValueError, match="pass tokens"):
        rank_heads_hf(str(path))                                       # weights without tokenizer files, no token ids
    p = recall_prompts(KB)
    with pytest.raises(ValueError, match="together"):
        rank_heads_hf(str(path), p.tokens)
    with pytest.raises(ValueError, match="metric"):
        rank_heads_hf(str(path), p.tokens, p.answers, metric="logits")
    with pytest.raises(ValueError, match="below the vocabulary"):
        rank_heads_hf(str(path), p.tokens + 96, p.answers)
    assert not no_network


# --- the kernels ---------------------------------------------------------------------------------------------------
# Shapes: (B, L, H, D, d). Rows and model width span several blocks at both tile sizes (CPU: 16 rows, 16-wide chunks;
# GPU: 64 rows, 64-wide chunks, 32 in fp32); odd head dims are masked inside BLOCK_D.
ATTRIBUTION_SHAPES = [(1, 1, 1, 16, 16), (37, 2, 3, 24, 150), (70, 1, 2, 40, 200), (130, 2, 1, 64, 96)]


def _attribution_inputs(B, L, H, D, d, dtype=torch.float32, scale=1.0):
    (z, w_o, r), seed = random_tensors([(B, L, H, D), (L, d, H * D), (B, d)], dtype=dtype, device=kernel_device(), scale=scale)
    return z, w_o, r, seed


def _attribution_tol(dtype):
    "r is cast to w_o's dtype for the dot: one more rounding of a 16-bit input than the reference sees."
    return tolerance(dtype, kernel_device()) * (2 if dtype != torch.float32 else 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", ATTRIBUTION_SHAPES)
@pytest.mark.parametrize("tiles", ["cpu", "gpu"])
def test_head_attribution_matches_reference(shape, dtype, tiles):
    z, w_o, r, seed = _attribution_inputs(*shape, dtype=dtype)
    expected = head_attribution_ref(z.double(), w_o.double(), r.to(dtype).double())
    with (gpu_tiles() if tiles == "gpu" else poisoned_outputs()), poisoned_outputs():
        got = head_attribution(z, w_o, r)
    assert got.dtype == torch.float32 and got.shape == shape[:3]
    assert_close(got, expected, _attribution_tol(dtype), seed=seed)


@pytest.mark.gpu
def test_head_attribution_simple_matches_reference():
    z, w_o, r, seed = _attribution_inputs(3, 2, 2, 24, 150)
    with poisoned_outputs():
        got = head_attribution_simple(z, w_o, r)
    assert_close(got, head_attribution_ref(z.double(), w_o.double(), r.double()), seed=seed)


@pytest.mark.gpu
def test_head_attribution_large_magnitudes_and_zeros():
    z, w_o, r, seed = _attribution_inputs(20, 1, 2, 32, 80, scale=1e3)
    z[3] = 0.0
    with poisoned_outputs():
        got = head_attribution(z, w_o, r)
    assert_close(got, head_attribution_ref(z.double(), w_o.double(), r.double()), seed=seed)
    assert (got[3] == 0).all()


def test_head_attribution_launch_choices():
    z, w_o, r = torch.empty(1000, 2, 8, 128, dtype=torch.bfloat16), torch.empty(2, 1024, 1024, dtype=torch.bfloat16), torch.empty(1000, 1024)
    with gpu_tiles():
        (launch,) = capture_launches(lambda: head_attribution(z, w_o, r))
    assert launch.constexprs == {"BLOCK_B": 64, "BLOCK_K": 64, "BLOCK_D": 128} and launch.num_warps == 8
    assert {c.label for c in compile_cases()} >= {"attribution D=64", "attribution D=256", "moments J=64"}


def test_head_attribution_bad_input():
    z, w_o, r, _ = _attribution_inputs(4, 2, 2, 8, 16)
    with pytest.raises(ValueError, match="need z"):
        head_attribution(z[0], w_o, r)
    with pytest.raises(ValueError, match="shapes disagree"):
        head_attribution(z, w_o[:, :, :15], r)
    with pytest.raises(LaunchError, match="share a dtype"):
        head_attribution(z, w_o.half(), r)
    with pytest.raises(LaunchError, match="supports float32"):
        head_attribution(z.double(), w_o.double(), r)
    with pytest.raises(LaunchError, match=f"limit of {MAX_HEAD_DIM}"):
        head_attribution(*(torch.empty(s, device=z.device) for s in ((1, 1, 1, 2 * MAX_HEAD_DIM), (1, 4, 2 * MAX_HEAD_DIM), (1, 4))))
    with pytest.raises(LaunchError, match="not meta"):
        head_attribution(z.to("meta"), w_o.to("meta"), r.to("meta"))
    if kernel_device().type == "cpu":
        with pytest.raises(LaunchError, match="bfloat16"):
            head_attribution(z.bfloat16(), w_o.bfloat16(), r)


@pytest.mark.parametrize("family", list(MODELS))
def test_head_logit_attribution_equals_direct_logit_attribution(family):
    model = MODELS[family]
    p = recall_prompts(KB)
    c = answer_weights(p.answers, p.candidates, V)
    positions = torch.randint(0, p.tokens.shape[1], (p.tokens.shape[0],), generator=torch.Generator().manual_seed(fresh_seed()))
    expected = direct_logit_attribution(model, p.tokens, c, positions).heads
    assert_close(head_logit_attribution(model, p.tokens, c, positions), expected)


MOMENT_SHAPES = [(2, 1, 16), (45, 5, 100), (300, 33, 70)]   # (N, J, d): several chunks, several samples per range


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", MOMENT_SHAPES)
@pytest.mark.parametrize("tiles", ["cpu", "gpu"])
def test_moments_match_reference(shape, dtype, tiles):
    """Against float64 on inputs with a large common mean (30 and -10, spread 1): without the shift, fp32 sums of
    squares would lose the centred Gram matrix to cancellation. The moments are sums of products of the inputs
    as stored, so the reference sees the same rounded inputs."""
    (x, y), seed = random_tensors([shape, (shape[0], shape[2])], device=kernel_device())
    x, y = (x + 30).to(dtype), (y - 10).to(dtype)
    expected = decomposition_moments_ref(x, y)
    with (gpu_tiles() if tiles == "gpu" else poisoned_outputs()), poisoned_outputs():
        got = decomposition_moments(x, y)
    for name, g, e in zip(("G", "rho", "x_mean", "y_mean"), got, expected):
        assert g.dtype == torch.float64
        assert_close(g.float(), e, tolerance(torch.float32, "cpu") * 10, name=name, seed=seed)


def test_fit_through_the_kernel_equals_the_float64_fit():
    heads, resid, w, b, g = planted(N=60, H=4, d=50)
    y = torch.einsum("h,nhd->nd", w, heads) + 0.4 * resid + b + 0.3 * torch.randn(60, 50, generator=g, dtype=torch.float64)
    ref = fit_mlp_decomposition(heads, resid, y)
    got = fit_mlp_decomposition(heads.float().to(kernel_device()), resid.float().to(kernel_device()),
                                y.float().to(kernel_device()), kernel=True)
    torch.testing.assert_close(got.head_weights.cpu(), ref.head_weights, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.intercept.cpu(), ref.intercept, rtol=0, atol=1e-4)
    assert abs(got.rel_error - ref.rel_error) < 1e-4


def test_moments_bad_input():
    x, y = torch.randn(4, 3, 16, device=kernel_device()), torch.randn(4, 16, device=kernel_device())
    with pytest.raises(ValueError, match="need x"):
        decomposition_moments(x, y[:, :8])
    with pytest.raises(LaunchError, match="share a dtype"):
        decomposition_moments(x, y.half())
    with pytest.raises(LaunchError, match="supports float32"):
        decomposition_moments(x.double(), y.double())
    with pytest.raises(LaunchError, match=f"limit of {MAX_MOMENT_INPUTS}"):
        decomposition_moments(torch.empty(2, MAX_MOMENT_INPUTS + 1, 16, device=x.device), torch.empty(2, 16, device=x.device))
