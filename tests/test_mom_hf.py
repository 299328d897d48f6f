"""The MoM `transformers` integration, offline on a tiny randomly initialised Llama: two-phase init from a HF checkpoint."""
import lmcourse  # noqa: F401  (first: enables the Triton interpreter when no GPU is visible)

import pytest
import torch

from lmcourse.mom import MoMConfig, engine_from_hf_llama, mom_chunk, mom_from_vanilla
from lmcourse.testing import assert_close

transformers = pytest.importorskip("transformers")


def _tiny_llama(**kw):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_engine_copy_and_identity_mom_reproduce_hf_logits(tie):
    hf = _tiny_llama(tie_word_embeddings=tie)
    ids = torch.randint(0, 128, (2, 15))
    with torch.no_grad():
        ref = hf(ids).logits.double()
        assert_close(engine_from_hf_llama(hf)(ids)[0], ref, 1e-5, name="engine copy")
        mom = mom_from_vanilla(engine_from_hf_llama(hf), MoMConfig(n_bottom=1, pool_size=2, rounds=2, n_top=1, router_dim=16)).eval()
        mom_chunk(mom).forced_routes = [(0, 0), (1, 1)]
        assert_close(mom(ids)[0], ref, 1e-5, name="identity-routed MoM")
        mom_chunk(mom).forced_routes = None                               # routed: a different function of the same weights
        assert (mom(ids)[0] - ref).abs().max() > 1e-4


def test_routed_mom_from_hf_trains():
    hf = _tiny_llama()
    mom = mom_from_vanilla(engine_from_hf_llama(hf), MoMConfig(n_bottom=0, pool_size=3, rounds=4, n_top=1, router="gru",
                                                               router_dim=16, impl="torch")).train()
    opt = torch.optim.AdamW(mom.parameters(), lr=3e-3)
    ids = torch.randint(0, 128, (4, 16))
    losses = []
    for _ in range(8):
        _, loss = mom(ids, ids)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert mom_chunk(mom).attn_router.cell.weight_ih.grad.abs().sum() > 0


def test_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match="plain Llama"):
        engine_from_hf_llama(_tiny_llama(attention_bias=True))
