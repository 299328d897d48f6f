"""Data: corpora (split, shuffle, caps, duplicates, stdlib+site and its provenance), the tokenizer cache, packed
batches, and the task generators checked by oracles that read only what a model sees."""
import random
import threading
import zlib

import lmcourse  # noqa: F401
import pytest
import torch

from lmcourse import data
from lmcourse.data import (ARROW, FILLER, FIRST_CONTENT, IGNORE_INDEX, SEP, TASKS, BPETokenizer, ByteTokenizer,
                           TokenStream, arith_decode, bpe_cache_path, bpe_tokenizer, corpus_files, corpus_info,
                           corpus_streams, corpus_versions, get_tokenizer, knowledge_base, load_corpus, load_hf_text,
                           make_task, markov_chain, register_task, worked_addition)

TEXTS = ["", "a", "def f(x):\n\treturn x  # ok", "ünïcödé ✓ 中文 🙂", "\x00\x7f trailing  \n\n", "x" * 1000]


def fresh_seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    print("seed", seed)   # shown by pytest when the test fails
    return seed


# ---- corpora ---------------------------------------------------------------------------------------------

def test_corpus_is_deterministic_and_split_disjoint():
    val = load_corpus(split="val")
    assert val == load_corpus(split="val")
    train = load_corpus(split="train", max_bytes=2_000_000)
    assert 2_000_000 <= sum(len(d.encode()) for d in train) < 2_000_000 + data.MAX_FILE_BYTES
    assert not set(val) & set(train)
    assert len(val) > 50 and len(set(train)) == len(train)


def test_corpus_is_shuffled_before_the_cap():
    keys = [k for k, _ in corpus_files()]
    assert keys != sorted(keys)
    other = [k for k, _ in corpus_files(shuffle_seed=1)]
    assert other != keys and sorted(other) == sorted(keys)
    whole = load_corpus()
    capped = load_corpus(max_bytes=500_000)
    assert capped == whole[:len(capped)]
    # the first 8 MB were 17% encodings/ tables in alphabetical order; shuffled they are a fair share (~4.4%)
    total = enc = 0
    for key, path in corpus_files():
        size = path.stat().st_size
        total, enc = total + size, enc + size * key.startswith("encodings/")
        if total >= 8_000_000: break
    assert enc / total < 0.08


def _tree(root, files: dict):
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())


def _name(prefix: str, val: bool = False, root_key: str = "") -> str:
    "A file name `prefix<i>.py` that the hash split (of `root_key` + the name) puts in validation (val=True) or train."
    return next(f"{prefix}{i}.py" for i in range(10_000)
                if (zlib.crc32(f"{root_key}{prefix}{i}.py".encode()) % 100 < data.VAL_PERCENT) == val)


def test_corpus_rules_on_a_synthetic_tree(tmp_path, monkeypatch):
    stdlib, site_dir = tmp_path / "lib", tmp_path / "site"
    _tree(stdlib, {_name("a"): "print('a')\n", _name("copy_of_a"): "print('a')\n", _name("empty"): "  \n",
                   _name("big"): "x = 1\n" * 50, _name("bad"): b"\xff\xfe not utf-8", _name("v", val=True): "shared = True\n",
                   _name("dup_of_val"): "shared = True\n", "site-packages/" + _name("inside"): "not stdlib\n",
                   _name("sub/b"): "print('b')\n"})
    site_key = "site-packages/"
    _tree(site_dir, {_name("pkg/mod", root_key=site_key): "import pkg\n", _name("pkg/vendored_a", root_key=site_key): "print('a')\n"})
    monkeypatch.setattr(data, "stdlib_root", lambda: stdlib)
    monkeypatch.setattr(data, "site_roots", lambda: [site_dir])
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 100)
    assert not any(key.startswith("site-packages/") for key, _ in corpus_files("stdlib") + corpus_files("stdlib", "val"))
    assert load_corpus(split="val") == ["shared = True\n"]
    train = load_corpus(split="train")
    # duplicates, empty, oversized and non-UTF-8 files are dropped; so is a train copy of a validation file
    assert sorted(train) == ["print('a')\n", "print('b')\n"]
    site_train = load_corpus("stdlib+site", "train")
    assert sorted(site_train) == ["import pkg\n", "print('a')\n", "print('b')\n"]
    assert site_key + _name("pkg/mod", root_key=site_key) in {k for k, _ in corpus_files("stdlib+site")}


def test_stdlib_site_and_its_provenance():
    keys = [k for k, _ in corpus_files("stdlib+site")]
    site_keys = [k for k in keys if k.startswith("site-packages/")]
    assert any(k.startswith("site-packages/torch/") for k in site_keys) and len(site_keys) > len(corpus_files())
    versions = corpus_versions("stdlib+site")
    assert versions["packages"]["torch"] == torch.__version__
    assert set(corpus_versions("stdlib")) == {"python"}
    docs = load_corpus("stdlib+site", "val", max_bytes=300_000)
    assert 300_000 <= sum(len(d.encode()) for d in docs)
    assert not set(docs) & set(load_corpus("stdlib+site", "train", max_bytes=300_000))


def test_corpus_info_counts_what_corpus_streams_reads():
    tok = ByteTokenizer()
    info = corpus_info("stdlib", 200_000, 50_000, tokenizer=tok)
    streams = corpus_streams(tok, 200_000, 50_000)
    for split, n in (("train", 200_000), ("val", 50_000)):
        docs = load_corpus("stdlib", split, max_bytes=n)
        assert info[split]["files"] == len(docs) == streams[split].n_docs
        assert info[split]["tokens"] == len(streams[split]) == info[split]["bytes"] + info[split]["files"]
    assert info["python"] == corpus_versions()["python"] and "tokens" not in corpus_info("stdlib", 10_000, 10_000)["val"]


def test_corpus_bad_names():
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("wikipedia")
    with pytest.raises(ValueError, match="split"):
        load_corpus(split="test")
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus_info("site")


# ---- tokenizers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_bpe_round_trip_and_cache():
    tok = bpe_tokenizer(vocab_size=512, train_bytes=300_000)
    for text in TEXTS + load_corpus(split="val")[:3]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 512 and tok.eos_id is not None
    assert bpe_cache_path(512, 300_000).exists()
    again = bpe_tokenizer(vocab_size=512, train_bytes=300_000)
    assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


def test_bpe_cache_key_covers_every_setting(monkeypatch):
    import tokenizers
    base = dict(vocab_size=512, train_bytes=300_000, corpus="stdlib", shuffle_seed=0)
    changed = [dict(base, vocab_size=1024), dict(base, train_bytes=400_000), dict(base, train_bytes=None),
               dict(base, corpus="stdlib+site"), dict(base, shuffle_seed=1)]
    paths = {bpe_cache_path(**kw) for kw in [base, *changed]}
    assert len(paths) == 1 + len(changed)
    path = bpe_cache_path(**base)
    monkeypatch.setattr(tokenizers, "__version__", "0.0.1")
    assert bpe_cache_path(**base) != path
    monkeypatch.undo()
    monkeypatch.setattr(data.platform, "python_version", lambda: "3.99.0")
    assert bpe_cache_path(**base) != path


def test_bpe_builders_running_at_once_do_not_collide(tmp_path, monkeypatch):
    "Two builders that both write before either renames (as two torchrun ranks may): both must succeed."
    monkeypatch.setenv("LMCOURSE_CACHE", str(tmp_path))
    both_written = threading.Barrier(2, timeout=60)
    save = BPETokenizer.save
    def save_then_wait(self, path):
        save(self, path)
        both_written.wait()
    monkeypatch.setattr(BPETokenizer, "save", save_then_wait)
    errors, results = [], []
    def build():
        try: results.append(bpe_tokenizer(vocab_size=300, train_bytes=30_000))
        except Exception as e: errors.append(e)
    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors, errors
    assert [p.name for p in tmp_path.iterdir()] == [bpe_cache_path(300, 30_000).name]   # no temporary file left
    loaded = BPETokenizer.load(bpe_cache_path(300, 30_000))
    assert loaded.encode(TEXTS[2]) == results[0].encode(TEXTS[2]) == results[1].encode(TEXTS[2])


# ---- packed batches ----------------------------------------------------------------------------------------

def test_packed_batches_mark_document_boundaries():
    tok = ByteTokenizer()
    stream = TokenStream.from_docs(["abc", "defgh", "ij"], tok, chunk=2)
    assert len(stream) == 3 + 5 + 2 + 3 and stream.n_docs == 3
    assert stream.tokens.tolist() == [*b"abc", 256, *b"defgh", 256, *b"ij", 256]
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
    assert len(TokenStream.from_docs([], tok)) == 0


# ---- tasks: common contract --------------------------------------------------------------------------------

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


# ---- copy and induction ------------------------------------------------------------------------------------

def induction_oracle(inputs):
    "The token after the latest earlier occurrence of each token (what an induction head predicts)."
    T = inputs.shape[1]
    earlier = (inputs[:, :, None] == inputs[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril(-1)
    latest = (earlier * torch.arange(1, T + 1)).argmax(2)
    return inputs.gather(1, (latest + 1).clamp(max=T - 1))


def positional_accuracy(batch):
    "The best fixed-distance copy: predict targets[t] as inputs[t - d]."
    ok = batch.targets != IGNORE_INDEX
    return max(((batch.inputs[:, :-d] == batch.targets[:, d:]) & ok[:, d:]).sum().item() / ok.sum().item()
               for d in range(1, batch.inputs.shape[1]))


@pytest.mark.parametrize("text", ["uniform", "markov"])
def test_induction_is_solved_by_induction_not_by_position(text):
    b = make_task("induction", 512, seed=fresh_seed(), text=text)
    info, ok = b.info, b.targets != IGNORE_INDEX
    assert b.inputs.shape == (512, 64)
    assert (induction_oracle(b.inputs) == b.targets)[ok].all()
    assert positional_accuracy(b) < 0.2
    for key in ("lengths", "prefix_lengths", "gap_lengths", "repeat"):
        assert len(set(info[key].tolist())) > 8, key
    assert torch.equal(info["copy_mask"], ok)
    t = torch.arange(b.inputs.shape[1])
    first, repeat, L = info["first"][:, None], info["repeat"][:, None], info["lengths"][:, None]
    assert torch.equal(ok, (t > repeat - 1) & (t < repeat + L - 1))           # x₂…x_L of the repeat, nothing else
    assert torch.equal(first, 1 + info["prefix_lengths"][:, None])
    assert torch.equal(repeat, first + L + info["gap_lengths"][:, None])
    assert ((b.inputs == FILLER) == (t >= repeat + L)).all()                   # right padding, and only there
    for i in range(0, 512, 37):   # the segment's tokens are distinct and the gap avoids them
        seg = b.inputs[i, first[i]:first[i] + L[i]]
        gap = b.inputs[i, first[i] + L[i]:repeat[i]]
        assert len(set(seg.tolist())) == len(seg) and not set(gap.tolist()) & set(seg.tolist())
        assert torch.equal(b.inputs[i, repeat[i]:repeat[i] + L[i]], seg)


def test_fixed_offset_layout_is_solved_by_position():
    "The control for the check above: the old layout (fixed offset and length) is solved by a positional head."
    b = make_task("induction", 256, seed=fresh_seed(), min_length=16, max_prefix=0, max_gap=0)
    assert positional_accuracy(b) == 1.0


def test_copy_targets_the_marked_copy():
    b = make_task("copy", 512, seed=fresh_seed(), length=12, vocab_size=20)
    info, ok = b.info, b.targets != IGNORE_INDEX
    assert b.inputs.shape == (512, 3 + 12 // 4 + 2 * 12 - 1)
    assert positional_accuracy(b) < 0.3
    assert len(set(info["lengths"].tolist())) == 12 and len(set(info["prefix_lengths"].tolist())) == 4
    assert torch.equal(ok.sum(1), info["lengths"]) and torch.equal(info["copy_mask"], ok)
    for i in range(512):
        f, r, n = info["first"][i], info["repeat"][i], info["lengths"][i]
        assert b.inputs[i, f - 1] == SEP and b.inputs[i, r - 1] == SEP
        assert torch.equal(b.targets[i, r - 1:r - 1 + n], b.inputs[i, f:f + n])


def test_markov_background_and_lm_targets():
    chain = markov_chain(61, branching=3, seed=5)
    assert torch.allclose(chain.sum(1), torch.ones(61)) and ((chain > 0).sum(1) == 3).all()
    b = make_task("induction", 256, seed=fresh_seed(), text="markov", branching=3, markov_seed=5, lm_targets=True)
    P = b.info["prefix_lengths"]
    a, c = b.inputs[:, 1:-1] - FIRST_CONTENT, b.inputs[:, 2:] - FIRST_CONTENT
    in_prefix = torch.arange(1, b.inputs.shape[1] - 1) < P[:, None]
    assert in_prefix.sum() > 1000 and (chain[a[in_prefix], c[in_prefix]] > 0).all()
    ok = b.targets != IGNORE_INDEX
    assert torch.equal(ok[:, :-1], b.inputs[:, 1:] != FILLER)
    assert (b.info["copy_mask"] <= ok).all() and b.info["copy_mask"].sum() < ok.sum()
    assert (induction_oracle(b.inputs) == b.targets)[b.info["copy_mask"]].all()


def test_repeat_tasks_reject_bad_settings():
    with pytest.raises(ValueError, match="too few"):
        make_task("induction", 2, length=30, vocab_size=32)
    with pytest.raises(ValueError, match="min_length"):
        make_task("induction", 2, min_length=1)
    with pytest.raises(ValueError, match="min_length"):
        make_task("copy", 2, length=4, min_length=5)
    with pytest.raises(ValueError, match="text must be"):
        make_task("copy", 2, text="zipf")
    with pytest.raises(ValueError, match="branching"):
        markov_chain(10, branching=11)


# ---- few-shot ----------------------------------------------------------------------------------------------

def few_shot_oracle(batch, demo_inputs=None):
    "The query's label from the demonstrations alone (the rule's kind and the token offsets, never its parameters)."
    info, k = batch.info, (batch.inputs.shape[1] - 3) // 4
    demos = (batch.inputs if demo_inputs is None else demo_inputs)[:, 1:1 + 4 * k].view(-1, k, 4)
    x, y = demos[..., 0] - info["input_offset"], demos[..., 2] - info["label_offset"]
    x_q = batch.inputs[:, 4 * k + 1] - info["input_offset"]
    if info["rule"] == "shift":
        return (x_q + y[:, 0] - x[:, 0]) % info["n_classes"]
    return y.gather(1, (x == x_q[:, None]).float().argmax(1, keepdim=True)).squeeze(1)


@pytest.mark.parametrize("rule,n_classes", [("map", 2), ("map", 5), ("shift", 7)])
@pytest.mark.parametrize("shots", [1, 2, 8, 250])
def test_few_shot_is_solvable_from_the_demonstrations(rule, n_classes, shots):
    b = make_task("few_shot", 300, seed=fresh_seed(), n_shots=shots, rule=rule, n_classes=n_classes)
    info = b.info
    assert b.inputs.shape == (300, 4 * shots + 3)
    answer = b.targets[:, info["query_pos"]] - info["label_offset"]
    assert (few_shot_oracle(b) == answer).all()
    wrong_demos = (few_shot_oracle(b, demo_inputs=b.inputs.roll(1, 0)) == answer).float().mean()
    assert wrong_demos < 0.5 + 1 / n_classes / 2
    assert (b.inputs[:, info["label_pos"]] == ARROW).all() and (b.inputs[:, info["label_pos"][:-1] + 2] == SEP).all()
    ok = b.targets != IGNORE_INDEX
    assert torch.equal(ok.nonzero()[:, 1].view(300, -1)[0], info["label_pos"])
    assert info["query_only"].sum() == 300 and info["query_only"][:, info["query_pos"]].all()
    assert info["predictable"][:, info["query_pos"]].all()
    if rule == "map" and shots == 1:   # one demonstration: it shows the query's own input
        assert torch.equal(b.inputs[:, 1], b.inputs[:, 5])


def test_few_shot_predictable_labels_are_those_the_earlier_demonstrations_fix():
    b = make_task("few_shot", 400, seed=fresh_seed(), n_shots=20, n_inputs=8)
    pred = b.info["predictable"]
    assert pred[:, b.info["label_pos"][0]].sum() == 0 and 0 < pred.sum() < 400 * 21
    for j in range(1, 21):
        qpos = 4 * j + 2
        prefix = data.Batch(b.inputs[:, :qpos + 1], b.targets[:, :qpos + 1], info={**b.info, "query_pos": qpos})
        right = few_shot_oracle(prefix) == b.targets[:, qpos] - b.info["label_offset"]
        seen = (b.inputs[:, 1:qpos - 1:4] == b.inputs[:, qpos - 1:qpos]).any(1)
        assert torch.equal(pred[:, qpos], seen) and right[seen].all()


def test_few_shot_bad_settings():
    with pytest.raises(ValueError, match="rule must be"):
        make_task("few_shot", 2, rule="xor")
    with pytest.raises(ValueError, match="n_shots"):
        make_task("few_shot", 2, n_shots=-1)
    with pytest.raises(ValueError, match="label_noise"):
        make_task("few_shot", 2, label_noise=1.5)
    with pytest.raises(ValueError, match="label_noise"):
        make_task("few_shot", 2, n_classes=1, label_noise=0.1)
    with pytest.raises(ValueError, match="prior over the shift"):
        make_task("few_shot", 2, rule="map", shift_probs=(0.5, 0.5))
    for probs in ((0.5, 0.6), (1.0,), (1.2, -0.2)):
        with pytest.raises(ValueError, match="shift_probs must be"):
            make_task("few_shot", 2, rule="shift", shift_probs=probs)


@pytest.mark.parametrize("rule,n_classes", [("map", 2), ("shift", 2), ("shift", 5)])
def test_few_shot_label_noise_replaces_demonstration_labels_only(rule, n_classes):
    seed, p = fresh_seed(), 0.3
    clean = make_task("few_shot", 3000, seed=seed, n_shots=6, rule=rule, n_classes=n_classes)
    b = make_task("few_shot", 3000, seed=seed, n_shots=6, rule=rule, n_classes=n_classes, label_noise=p)
    info, demo_label = b.info, b.info["label_pos"][:-1] + 1
    assert torch.equal(make_task("few_shot", 3000, seed=seed, n_shots=6, rule=rule, n_classes=n_classes,
                                 label_noise=0.0).inputs, clean.inputs)             # no noise: the same batch
    changed = b.inputs[:, demo_label] != clean.inputs[:, demo_label]
    assert torch.equal(changed, info["noisy"])                                       # a noisy label is another label
    assert abs(info["noisy"].float().mean().item() - p) < 0.02
    unchanged = torch.ones_like(b.inputs, dtype=torch.bool); unchanged[:, demo_label] = False
    assert torch.equal(b.inputs[unchanged], clean.inputs[unchanged])                 # inputs, arrows, separators
    assert torch.equal(b.targets[:, info["query_pos"]], clean.targets[:, info["query_pos"]])   # the query's: never
    assert torch.equal(b.targets[:, info["label_pos"][:-1]], b.inputs[:, demo_label])          # targets = sequence
    assert b.inputs.max() < info["vocab_size"] and info["label_noise"] == p
    if n_classes > 2:                                                                # uniform over the other labels
        offset = (b.inputs[:, demo_label] - clean.inputs[:, demo_label])[changed] % n_classes
        counts = torch.bincount(offset, minlength=n_classes).float()
        assert counts[0] == 0 and (counts[1:] / counts[1:].mean() - 1).abs().max() < 0.15


def test_few_shot_shift_prior():
    probs = torch.tensor([0.6, 0.1, 0.3])
    b = make_task("few_shot", 20000, seed=fresh_seed(), n_shots=2, rule="shift", n_classes=3, shift_probs=probs)
    freq = torch.bincount(b.info["shift"], minlength=3).float() / 20000
    assert (freq - probs).abs().max() < 0.015
    assert (few_shot_oracle(b) == b.targets[:, b.info["query_pos"]] - b.info["label_offset"]).all()


# ---- facts -------------------------------------------------------------------------------------------------

def test_facts_state_the_knowledge_base():
    seed = fresh_seed()
    f = make_task("facts", 2000, seed=seed)
    kb, info = f.info["kb"], f.info
    rows = torch.arange(2000)
    objects = kb.table[info["subjects"], info["relations"]]
    assert torch.equal(info["objects"], objects)
    assert torch.equal(f.targets[rows, info["answer_pos"]], kb.object_ids[info["relations"], objects])
    assert ((f.targets != IGNORE_INDEX).sum(1) == 1).all()
    vocab = info["vocab"]
    for i in range(0, 2000, 97):   # the row is the sentence, word by word, after BOS, then padding
        sentence = kb.sentence(info["subjects"][i], info["relations"][i], info["templates"][i])
        words, row = sentence.split(), vocab.decode(f.inputs[i, 1:]).split()
        assert row in (words, words[:-1]) and f.inputs[i, 0] == data.BOS   # the longest rows lose the '.' to the shift
        assert vocab.decode([f.targets[i, info["answer_pos"][i]]]) == words[-2] and words[-1] == "."
        assert kb.subjects[info["subjects"][i]] in words
    for r in range(4):   # several phrasings of every relation
        assert len(set(info["templates"][info["relations"] == r].tolist())) == 3
    assert torch.equal(make_task("facts", 5, seed=seed + 1).info["kb"].table, kb.table)
    assert not torch.equal(make_task("facts", 5, seed=seed, kb_seed=1).info["kb"].table, kb.table)


def test_facts_templates_split_and_prior():
    train = make_task("facts", 500, seed=fresh_seed(), templates="train").info["templates"]
    test = make_task("facts", 500, seed=fresh_seed(), templates="test").info["templates"]
    assert set(train.tolist()) == {0, 1} and set(test.tolist()) == {2}
    uniform, zipf = knowledge_base(n_subjects=3000), knowledge_base(n_subjects=3000, object_zipf=1.0)
    top = lambda kb: (kb.table == 0).float().mean().item()
    expected = 1 / sum(1 / k for k in range(1, 33))   # p(o_0) under (k+1)^-1 over 32 objects
    assert abs(top(zipf) - expected) < 0.03 and abs(top(uniform) - 1 / 32) < 0.015
    with pytest.raises(ValueError, match="templates must be"):
        make_task("facts", 2, templates="held-out")
    with pytest.raises(ValueError, match="object_zipf"):
        knowledge_base(object_zipf=-1)


def test_knowledge_base_vocabulary_and_invented_relations():
    kb = knowledge_base(n_subjects=10, n_relations=11, n_objects=5, kb_seed=fresh_seed())
    assert kb.relations[:8] == list(data.RELATIONS) and len(set(kb.relations)) == 11
    names = kb.subjects + [o for pool in kb.objects for o in pool] + kb.relations[8:]
    assert len(set(names)) == len(names) and not set(names) & set(data.RELATIONS)
    v = kb.vocab
    for s in range(10):
        for r in range(11):
            for t in range(3):
                text = kb.sentence(s, r, t)
                assert v.decode(v.encode(text)) == text and len(text.split()) <= kb.max_words
    assert v.encode("<bos> <sep> <pad>") == [0, 1, 2] and kb.object_ids.shape == (11, 5)
    other = kb.sentence(0, 0, obj=(int(kb.table[0, 0]) + 1) % 5)
    assert other != kb.sentence(0, 0) and other.split()[-2] in kb.objects[0]
    with pytest.raises(KeyError, match="not in the vocabulary"):
        v.encode("the capital of atlantis")
    f = make_task("facts", 50, seed=0, n_subjects=10, n_relations=11, n_objects=5)
    assert f.inputs.shape[1] == kb.max_words and f.info["vocab_size"] == v.vocab_size


# ---- the rest ----------------------------------------------------------------------------------------------

def test_task_semantics():
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
