"Data: corpus determinism and split, tokenizer round trips, packed batches, task generators, offline errors."
import lmcourse  # noqa: F401
import pytest
import torch

from lmcourse.data import (IGNORE_INDEX, TASKS, ByteTokenizer, TokenStream, arith_decode, bpe_tokenizer, get_tokenizer,
                           load_corpus, load_hf_text, make_task, register_task, worked_addition)

TEXTS = ["", "a", "def f(x):\n\treturn x  # ok", "ünïcödé ✓ 中文 🙂", "\x00\x7f trailing  \n\n", "x" * 1000]


def test_corpus_is_deterministic_and_split_disjoint():
    val = load_corpus(split="val")
    assert val == load_corpus(split="val")
    train = load_corpus(split="train", max_bytes=2_000_000)
    assert 2_000_000 <= sum(len(d.encode()) for d in train) < 3_000_000
    assert not set(val) & set(train)
    assert len(val) > 10


def test_corpus_bad_names():
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("wikipedia")
    with pytest.raises(ValueError, match="split"):
        load_corpus(split="test")


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_bpe_round_trip_and_cache():
    tok = bpe_tokenizer(vocab_size=512, train_bytes=300_000)
    for text in TEXTS + load_corpus(split="val")[:3]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 512 and tok.eos_id is not None
    again = bpe_tokenizer(vocab_size=512, train_bytes=300_000)
    assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


def test_packed_batches_mark_document_boundaries():
    tok = ByteTokenizer()
    stream = TokenStream.from_docs(["abc", "defgh", "ij"], tok)
    assert len(stream) == 3 + 5 + 2 + 3
    b = stream.batch(16, 6, torch.Generator().manual_seed(0))
    assert b.inputs.shape == b.targets.shape == b.segment_ids.shape == (16, 6)
    assert (b.segment_ids[:, 0] == 0).all() and (b.segment_ids.diff(dim=1) >= 0).all()
    boundary = torch.zeros_like(b.targets, dtype=torch.bool)
    boundary[:, :-1] = b.segment_ids[:, 1:] != b.segment_ids[:, :-1]
    # a target is ignored exactly where the next input starts a new document (the last column is checked via EOS)
    assert ((b.targets == IGNORE_INDEX)[:, :-1] == boundary[:, :-1]).all()
    ok = b.targets != IGNORE_INDEX
    assert torch.equal(b.targets[:, :-1][ok[:, :-1]], b.inputs[:, 1:][ok[:, :-1]])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(stream.batch(4, 5, g1).inputs, stream.batch(4, 5, g2).inputs)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic_and_in_vocab(name):
    a, b = make_task(name, 6, seed=3), make_task(name, 6, seed=3)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(make_task(name, 6, seed=4).inputs, a.inputs)
    assert a.inputs.shape == a.targets.shape
    assert (a.targets != IGNORE_INDEX).any(1).all()
    assert 0 <= a.inputs.min() and a.inputs.max() < a.info["vocab_size"] and a.targets.max() < a.info["vocab_size"]
    ok = a.targets != IGNORE_INDEX      # a target is the next input token
    assert torch.equal(a.targets[:, :-1][ok[:, :-1]], a.inputs[:, 1:][ok[:, :-1]])


def test_task_semantics():
    c = make_task("copy", 4, seed=0, length=6)
    assert torch.equal(c.targets[:, -6:], c.inputs[:, 1:7])
    f = make_task("facts", 50, seed=1)
    kb = f.info["kb"]
    subj, rel = f.inputs[:, 1] - f.info["subject_offset"], f.inputs[:, 2] - f.info["relation_offset"]
    assert torch.equal(f.targets[:, -1] - f.info["object_offset"], kb[subj, rel])
    assert worked_addition(47, 85, 2) == ("47+85|", "7+5+0=12;4+8+1=13;=132.")
    a = make_task("arithmetic", 5, seed=2, n_digits=3)
    for row, ans in zip(a.targets, a.info["answers"]):
        assert arith_decode(row[row >= 0].tolist()).endswith(f"={ans}.")
    with pytest.raises(KeyError, match="unknown task"):
        make_task("nope", 1)
    with pytest.raises(ValueError, match="already registered"):
        register_task("copy")(lambda n, seed=0: None)


def test_hf_loader_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="load_corpus\\('stdlib'\\)"):
        load_hf_text("roneneldan/TinyStories", max_docs=10)
