"""AoE inside Hugging Face MoE families (Mixtral, Qwen2-MoE): the swapped blocks against an independent float64
per-token loop, the recorded router logits and aux loss, save and reload, and the router-free swap. Offline: tiny
random-init configs."""
import lmcourse  # noqa: F401  (first: sets TRITON_INTERPRET=1 when no GPU is visible)

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from lmcourse.aoe import AoEExperts, load_aoe_moe, save_aoe_moe, param_mismatch, remove_routers, swap_moe_for_aoe
from lmcourse.testing import assert_close

D, N_EXPERTS, TOP_K, D_LOW = 64, 4, 2, 16


def mixtral(**kw):
    cfg = MixtralConfig(vocab_size=96, hidden_size=D, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K,
                        max_position_embeddings=64, output_router_logits=True, **kw)
    return MixtralForCausalLM(cfg)


def qwen_moe():
    cfg = Qwen2MoeConfig(vocab_size=96, hidden_size=D, intermediate_size=80, moe_intermediate_size=48,
                         shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=N_EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=False,
                         max_position_embeddings=64, output_router_logits=True)
    return Qwen2MoeForCausalLM(cfg)


def block_io(model, layer: int, ids):
    "(input [N, d], output [N, d]) of decoder layer `layer`'s MoE block in one forward."
    seen = {}
    block = model.model.layers[layer].mlp
    handles = [block.register_forward_pre_hook(lambda m, a: seen.update(h=a[0].detach().reshape(-1, D))),
               block.register_forward_hook(lambda m, a, o: seen.update(y=o.detach().reshape(-1, D)))]
    out = model(input_ids=ids)
    for h in handles: h.remove()
    return seen["h"], seen["y"], out


def aoe_loop(h, gate, experts, renormalize: bool):
    "The AoE block written token by token in float64: norms, top-K, gate weights, SwiGLU of the winners."
    h = h.double()
    w_down, w_up, w_p, w_o = (p.detach().double() for p in (gate.w_down, experts.w_up, experts.w_p, experts.w_o))
    out = torch.zeros_like(h)
    for t in range(len(h)):
        c = [h[t] @ w_down[i] for i in range(N_EXPERTS)]
        norms = torch.stack([ci.norm() for ci in c])
        top = torch.topk(norms, TOP_K).indices
        g = torch.softmax(norms[top], 0) if renormalize else torch.softmax(norms, 0)[top]
        for gk, i in zip(g, top.tolist()):
            out[t] += gk * ((F.silu(c[i] @ w_up[i]) * (h[t] @ w_p[i])) @ w_o[i])
    return out


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_mixtral_block_matches_a_token_loop(impl):
    torch.manual_seed(0)
    model = mixtral().eval()
    blocks = swap_moe_for_aoe(model, D_LOW, impl=impl)
    ids = torch.randint(0, 96, (2, 13))
    h, y, _ = block_io(model, 1, ids)
    assert_close(y, aoe_loop(h, blocks[1].gate, blocks[1].experts, renormalize=True), 1e-5, "Mixtral AoE block")


def test_router_logits_are_the_norms_and_aux_loss_is_aoe_balance():
    torch.manual_seed(1)
    model = mixtral(router_aux_loss_coef=0.05)
    blocks = swap_moe_for_aoe(model, D_LOW)
    ids = torch.randint(0, 96, (2, 11))
    h, _, out = block_io(model, 0, ids)
    expected = torch.linalg.vector_norm(torch.einsum("td,edr->ter", h.double(), blocks[0].gate.w_down.double()), dim=-1)
    assert_close(out.router_logits[0], expected, 1e-5, "layer-0 router logits")
    norms = torch.cat(out.router_logits).double()                 # transformers pools the layers
    f = torch.bincount(torch.topk(norms, TOP_K).indices.flatten(), minlength=N_EXPERTS) / len(norms)
    assert_close(out.aux_loss, N_EXPERTS * (f * torch.softmax(norms, -1).mean(0)).sum(), 1e-5, "aux loss")
    out.aux_loss.backward()                                       # the balance loss alone reaches W_down
    assert all(b.gate.w_down.grad.abs().sum() > 0 for b in blocks)
    assert blocks[-1].experts.w_up.grad is None                   # the last experts feed no norm


def test_parameters_match_up_to_the_routers():
    model = mixtral()
    before = sum(p.numel() for p in model.parameters())
    swap_moe_for_aoe(model, D_LOW)
    after = sum(p.numel() for p in model.parameters())
    per_expert = param_mismatch(D, 80, D_LOW)["diff"]            # D rounded up: never fewer parameters
    assert after - before == 2 * N_EXPERTS * (per_expert - D)     # and each layer's router (n·d) is gone


def test_qwen_moe_keeps_its_shared_expert():
    torch.manual_seed(2)
    model = qwen_moe().eval()
    blocks = swap_moe_for_aoe(model, D_LOW)
    ids = torch.randint(0, 96, (1, 9))
    h, y, _ = block_io(model, 0, ids)
    b = blocks[0]
    shared = torch.sigmoid(b.shared_expert_gate(h)) * b.shared_expert(h)
    expected = aoe_loop(h, b.gate, b.experts, renormalize=False) + shared.double()   # norm_topk_prob=False
    assert_close(y, expected, 1e-5, "Qwen2-MoE AoE block")


def test_save_and_reload(tmp_path):
    torch.manual_seed(3)
    model = mixtral().eval()
    swap_moe_for_aoe(model, D_LOW)
    ids = torch.randint(0, 96, (2, 10))
    save_aoe_moe(model, tmp_path)
    again = load_aoe_moe(tmp_path)
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    plain = tmp_path / "plain"
    mixtral().save_pretrained(plain)
    with pytest.raises(ValueError, match="aoe_d_low"):
        load_aoe_moe(plain)
    model.save_pretrained(tmp_path / "legacy")                    # renamed back to Mixtral's legacy names
    with pytest.raises(ValueError, match="save_aoe_moe"):
        load_aoe_moe(tmp_path / "legacy")


def test_swap_after_a_forward_still_records_router_logits():
    model = mixtral().eval()
    ids = torch.randint(0, 96, (1, 8))
    model(input_ids=ids)                                          # transformers installs its hooks here
    swap_moe_for_aoe(model, D_LOW)
    out = model(input_ids=ids)
    assert len(out.router_logits) == 2 and all((r >= 0).all() for r in out.router_logits)


@pytest.mark.parametrize("node", ["gate", "swiglu"])
def test_remove_routers_selects_by_a_node_norm(node):
    torch.manual_seed(4)
    model = mixtral().eval()
    remove_routers(model, node)
    ids = torch.randint(0, 96, (2, 9))
    h, y, out = block_io(model, 1, ids)
    experts = model.model.layers[1].mlp.experts
    w = experts.gate_up_proj.detach().double()
    node_out = torch.stack([h.double() @ w[i, :80].t() for i in range(N_EXPERTS)], 1)        # [N, n, F]
    if node == "swiglu":
        node_out = F.silu(node_out) * torch.stack([h.double() @ w[i, 80:].t() for i in range(N_EXPERTS)], 1)
    assert_close(out.router_logits[1], node_out.norm(dim=-1), 1e-5, f"{node} norms")
    assert not [n for n, _ in model.named_parameters() if n.endswith("gate.weight")]


def test_bad_input_is_refused():
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=D, intermediate_size=80, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    with pytest.raises(ValueError, match="swap_mlp_for_aoe"):
        swap_moe_for_aoe(dense, D_LOW)
    with pytest.raises(ValueError, match="node"):
        remove_routers(mixtral(), "up")
    with pytest.raises(ValueError, match="impl must be"):
        swap_moe_for_aoe(mixtral(), D_LOW, impl="cuda")
    model = mixtral()
    block = swap_moe_for_aoe(model, D_LOW)[0]
    with pytest.raises(RuntimeError, match="gate's cache"):
        block.experts(torch.randn(5, D), torch.zeros(5, TOP_K, dtype=torch.long), torch.ones(5, TOP_K))
    assert isinstance(block.experts, AoEExperts)
