"""HoPE in Hugging Face `transformers`, offline, on tiny random-init Llama models: the ROPE_INIT_FUNCTIONS entry,
the config validation, the weight copy from the course model, and logits / cached generation equal to the
engine's HoPE model with the same weights."""
import lmcourse  # noqa: F401  (first)

import pytest
import torch

from lmcourse.hope import (hf_llama_from_engine, hope_frequencies, hope_kept_pairs, hope_rope_init, hope_rope_parameters,
                           positional_encoding, register_hope_rope)
from lmcourse.model import ModelConfig, Transformer
from lmcourse.testing import assert_close

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models():
    register_hope_rope()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96)
    rope = Transformer(cfg, positional=positional_encoding("rope", train_len=32)).eval()
    hope = Transformer(cfg, positional=positional_encoding("hope", train_len=32)).eval()
    hope.load_state_dict(rope.state_dict())
    return cfg, rope, hope


def test_rope_init_function_is_registered_and_zeroes_the_dropped_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    assert register_hope_rope() == "hope" and ROPE_INIT_FUNCTIONS["hope"] is hope_rope_init
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters=hope_rope_parameters(train_len=512))
    inv_freq, factor = hope_rope_init(cfg)
    assert factor == 1.0 and inv_freq.dtype == torch.float32
    assert torch.equal(inv_freq, hope_frequencies(64, hope_kept_pairs(64, 10_000, 512)).float())
    assert (inv_freq != 0).sum() == 16
    direct = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters=hope_rope_parameters(kept_pairs=5))
    assert (hope_rope_init(direct)[0] != 0).sum() == 5


def test_config_validation_is_loud():
    from transformers import LlamaConfig
    register_hope_rope()
    with pytest.raises(KeyError, match="unknown HoPE rope_parameters"):
        LlamaConfig(rope_parameters={"rope_type": "hope", "rope_theta": 1e4, "train_length": 512})
    with pytest.raises(KeyError, match="exactly one"):
        LlamaConfig(rope_parameters={"rope_type": "hope", "rope_theta": 1e4})
    with pytest.raises(ValueError, match="exactly one"):
        hope_rope_parameters(train_len=512, kept_pairs=3)


def test_weight_copy_with_plain_rope(models):
    _, rope, _ = models
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert_close(hf_llama_from_engine(rope)(ids).logits, rope(ids)[0], 1e-5)


def test_hf_hope_logits_equal_the_engine_model(models):
    cfg, rope, hope = models
    hf = hf_llama_from_engine(hope, hope_rope_parameters(train_len=32))
    ids = torch.randint(0, 128, (3, 90))                    # beyond the training length, as extrapolation evaluates
    with torch.no_grad():
        ours, theirs = hope(ids)[0], hf(ids).logits
        assert_close(theirs, ours, 1e-5)
        assert (ours - rope(ids)[0]).abs().max() > 1e-3     # HoPE is not RoPE
        nope = hf_llama_from_engine(hope, hope_rope_parameters(kept_pairs=0))
        nope_ours = Transformer(cfg, positional=positional_encoding("nope", 32)).eval()
        nope_ours.load_state_dict(hope.state_dict())
        assert_close(nope(ids).logits, nope_ours(ids)[0], 1e-5)


def test_hf_cached_generation_equals_the_engine(models):
    _, _, hope = models
    hf = hf_llama_from_engine(hope, hope_rope_parameters(train_len=32))
    prompt = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        ours = hope.generate(prompt, 30)                       # KV cache: positions offset by its length
        theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(prompt),
                             pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_bad_models_are_refused():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, rope_layout="interleaved")
    with pytest.raises(ValueError, match="rope_layout='half'"):
        hf_llama_from_engine(Transformer(cfg))
