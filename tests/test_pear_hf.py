"""PEAR on Hugging Face models, offline on tiny random-init configs: folding (Llama MHA and GQA, Qwen2 with q/k/v
biases, GPT-2 with its transposed Conv1D), the coefficient layers on a HookedHF (kernel = reference), training through
the engine's loop, detection and the pre-screen."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lmcourse.interp import HookedHF, PathPatching, anatomy
from lmcourse.model import patch
from lmcourse.pear import (attach_pear, compare_backends, copy_metric, detach_pear, fold_pear, hf_bos_id,
                           pear_coefficients, prescreen_scores, proxy_task, suppression_scores, train_coefficients)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama-mha":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128))
    elif family == "llama-gqa":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    elif family == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=None,
                                       eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with torch.no_grad():                          # random biases and norm gains: nothing trivially 0 or 1
        for name, p in m.named_parameters():
            if name.endswith("bias"): p.normal_(0, 0.1)
            elif p.dim() == 1: p.uniform_(0.5, 1.5)
    return m.eval().requires_grad_(False)


FAMILIES = ["llama-mha", "llama-gqa", "qwen2", "gpt2"]


def reweighted(hooked, tau, tokens):
    with patch(hooked, {f"blocks.{l}.attn.hook_z": (lambda z, l=l: z * tau[l][:, None]) for l in range(len(tau))}):
        return hooked(tokens)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_pear_on_hugging_face_models_is_exact(family):
    hf = make(family)
    hooked = HookedHF(hf)
    tokens = proxy_task(3, 11, vocab_size=128, bos_id=hf_bos_id(hf)).inputs
    tau = torch.rand(2, 4) * 1.8
    want = reweighted(hooked, tau, tokens)
    n_params = sum(p.numel() for p in hf.parameters())
    v_before = [p.clone() for n, p in hf.named_parameters() if "v_proj" in n or "c_attn" in n]
    fold_pear(hf, tau)
    assert torch.allclose(hf(tokens).logits, want, atol=1e-5)
    assert sum(p.numel() for p in hf.parameters()) == n_params
    v_after = [p for n, p in hf.named_parameters() if "v_proj" in n or "c_attn" in n]
    assert all(torch.equal(a, b) for a, b in zip(v_before, v_after))    # values untouched: only W_O columns


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_coefficients_on_hooked_hf_kernel_equals_reference(family):
    hf = make(family)
    hooked = HookedHF(hf)
    batch = proxy_task(3, 9, vocab_size=128, bos_id=hf_bos_id(hf))
    plain = hooked(batch.inputs)[0]
    layers = attach_pear(hooked, [(0, 1), (1, 3)], backend="triton")
    assert torch.allclose(hooked(batch.inputs)[0], plain, atol=1e-5)
    with torch.no_grad():
        for layer, value in zip(layers, (0.4, 1.3)): layer.coefficients.fill_(value)
    _, acts = hooked.run_with_cache(batch.inputs, ["blocks.1.attn.hook_z"])   # the hooks follow the new modules
    assert acts["blocks.1.attn.hook_z"].shape == (3, batch.inputs.shape[1], 4, 16)
    check = compare_backends(hooked, batch)
    assert torch.allclose(*check["logits"], atol=1e-5)
    for kernel, reference in check["grads"]:
        assert torch.allclose(kernel, reference, atol=1e-6, rtol=1e-4) and kernel.abs().sum() > 0
    tau = pear_coefficients(hooked)
    detach_pear(hooked)
    fresh = HookedHF(make(family))
    assert torch.allclose(hooked(batch.inputs)[0], reweighted(fresh, tau, batch.inputs), atol=1e-5)


def test_train_coefficients_on_a_hugging_face_model():
    hf = make("llama-gqa")
    hooked = HookedHF(hf)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    train_coefficients(hooked, [(1, 2)], vocab_size=128, n=8, steps=4, batch_size=4, lr=5e-2, bos_id=hf_bos_id(hf),
                       device="cpu")
    tau = detach_pear(hooked, fold=False)
    assert tau[1, 2] != 1 and (tau.flatten()[[0, 1, 2, 3, 4, 5, 7]] == 1).all()
    assert all(torch.equal(v, before[k]) for k, v in hf.state_dict().items())


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_detection_and_prescreen_on_hugging_face_models(family):
    hooked = HookedHF(make(family))
    bos = hf_bos_id(hooked.model)
    settings = ((6, 8),)
    scores = suppression_scores(hooked, vocab_size=128, settings=settings, bos_id=bos)
    assert scores.shape == (2, 4) and torch.isfinite(scores).all()
    batch = proxy_task(6, 8, vocab_size=128, seed=0, bos_id=bos)
    _, acts = hooked.run_with_cache(batch.inputs, ["norm.hook_scale"])
    with patch(hooked, {"norm.hook_scale": lambda s: acts["norm.hook_scale"].repeat(len(s) // 6, 1, 1)}):
        exact = PathPatching(hooked, batch.inputs, positions=batch.info["position"], freeze_mlps=True).scores(copy_metric(batch))
    for backend in ("reference", "triton"):
        screen = prescreen_scores(hooked, vocab_size=128, settings=settings, bos_id=bos, backend=backend)
        assert torch.allclose(screen.flatten(), exact, atol=3e-5, rtol=1e-3), (backend, screen, exact)
    assert anatomy(hooked).family == family.split("-")[0]
