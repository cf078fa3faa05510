"""The copy injector with an episodic memory of input embeddings: the logits it raises are the recalled token's."""

from __future__ import annotations

import pytest
import torch
from graftkit.injectors.copy import merge_heads
from matrix import make_memory

import graftkit
from graftkit.graft import Graft, pad

COPY_MEMORY = dict(values="input", write_layer=0, standardize=False, value_offset=1, key_span=2, slots=16)


@pytest.fixture
def copy_graft(tiny_backbone):
    grafts = []

    def make(family="llama", **options):
        backbone = tiny_backbone(family)
        torch.manual_seed(0)
        memory = make_memory("episodic", backbone.hidden_size, **COPY_MEMORY)
        injector = graftkit.create("injector", "copy", hidden_size=backbone.hidden_size, num_layers=backbone.num_layers, layer=0, **options)
        grafts.append(Graft(backbone, memory, injector))
        return grafts[-1]

    yield make
    for graft in grafts:
        graft.injector.detach()


def question(graft, texts):
    return pad([graft.backbone.text_ids(t) for t in texts], graft.backbone.tokenizer.pad_token_id, side="left")


def bare_logits(graft, ids, mask):
    graft.injector.detach()
    try:
        with torch.no_grad():
            return graft.backbone.model(input_ids=ids, attention_mask=mask).logits
    finally:
        graft.injector.attach(graft.backbone)


def test_scores_name_the_token_an_embedding_is(copy_graft):
    graft = copy_graft()
    embedding = graft.backbone.embedding.weight
    tokens = torch.randint(0, embedding.shape[0], (64,))
    with torch.no_grad():
        scores = graft.injector.scores(embedding[tokens].float())
    assert torch.equal(scores.argmax(-1), tokens)
    torch.testing.assert_close(scores.gather(1, tokens[:, None]).squeeze(1), torch.ones(64), atol=1e-3, rtol=0)


@pytest.mark.parametrize("merge", ["mean", "product", "both"])
def test_an_empty_memory_keeps_the_backbone_and_cached_generation_matches(copy_graft, merge):
    graft = copy_graft(gate_init=4.0, merge_heads=merge)
    ids, mask = question(graft, ["Where is Mary?", "Where is the football now?"])
    with torch.no_grad():
        empty = graft(ids, graft.init_state(2), mask).logits
    torch.testing.assert_close(empty, bare_logits(graft, ids, mask), atol=1e-5, rtol=0)
    state = graft.memorize(["Mary went to the kitchen.", "Sandra took the apple to the office."])
    cached = graft.generate(ids, state, mask, max_new_tokens=5, use_cache=True)
    assert torch.equal(cached, graft.generate(ids, state, mask, max_new_tokens=5, use_cache=False))


def test_a_closed_gate_keeps_the_backbone_with_a_full_memory(copy_graft):
    """Every change the injector makes to the logits, the end-of-turn raise included, goes through its gate."""
    graft = copy_graft()
    ids, mask = question(graft, ["Where is Mary?", "Where is the football now?"])
    state = graft.memorize(["Mary went to the kitchen.", "Sandra took the apple to the office."])
    with torch.no_grad():
        graft.injector.stop.bias.fill_(5.0)
        opened = graft(ids, state, mask).logits
        graft.injector.gate.bias.fill_(-1e4)
        closed = graft(ids, state, mask).logits
    bare = bare_logits(graft, ids, mask)
    assert (opened - bare).abs().max() > 1.0
    torch.testing.assert_close(closed, bare, atol=1e-5, rtol=0)


def test_a_recalled_token_is_generated_even_if_never_seen(copy_graft):
    """One stored pair (a token, then x): every read returns x's embedding, and an open gate makes x the answer."""
    graft = copy_graft(gate_init=20.0, boost=1000.0)
    with torch.no_grad():
        graft.memory.null.fill_(-100.0)  # nothing else to attend to
    vocab = graft.backbone.embedding.weight.shape[0]
    for x in torch.randint(10, vocab, (3,)).tolist():
        state = graft.memorize(input_ids=torch.tensor([[5, x]]))
        ids, mask = question(graft, ["Where is Mary?"])
        first = graft.generate(ids, state, mask, max_new_tokens=1)
        assert first.item() == x


def test_training_signal_reaches_the_query_the_pool_the_gate_and_the_keys(copy_graft):
    graft = copy_graft()
    state = graft.memorize(["Mary went to the kitchen.", "Sandra took the apple to the office."])
    ids, mask = question(graft, ["Where is Mary?", "Where is the football now?"])
    graft(ids, state, mask, labels=ids).loss.backward()
    for name in (
        "injector.to_query.weight",
        "injector.window",
        "injector.to_window_query.weight",
        "injector.pool.to_q.weight",
        "injector.gate.weight",
        "injector.gate_by_match.weight",
        "injector.stop.weight",
        "memory.to_keys.weight",
        "memory.to_queries.weight",
        "memory.to_beta.weight",
    ):
        grad = dict(graft.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_config_fields_are_documented():
    config = graftkit.components("injector")["copy"].Config
    assert config.model_config.get("extra") == "forbid"
    assert all(field.description for field in config.model_fields.values())


def test_an_untrained_graft_reads_what_followed_the_current_token(copy_graft):
    """The token query starts as the input embedding and episodic keys start as the written token: at a position
    whose token was written, the token read holds the token written after it."""
    graft = copy_graft()
    vocab = graft.backbone.embedding.weight.shape[0]
    written = torch.randperm(vocab - 10)[:6] + 10
    state = graft.memorize(input_ids=written[None])
    ids = torch.tensor([[int(written[1]), int(written[3])]])
    with torch.no_grad():
        graft(ids, state)
    own = graft.injector.pool.past[1][0, :, 1]  # the token query's slot distributions at the two positions (write order)
    values = graft.memory.in_write_order(state)[1][0]
    assert graft.injector.scores(own @ values.float()).argmax(-1).tolist() == [int(written[2]), int(written[4])]


def test_the_pool_mixes_the_reads_of_the_positions_up_to_each_and_a_cached_step_sees_the_same():
    from graftkit.injectors.copy import ReadPool

    torch.manual_seed(0)
    pool, n = ReadPool(8, kinds=2), 5
    with torch.no_grad():
        pool.to_q.weight.zero_()  # every allowed entry weighs the same
    hidden, reads = torch.randn(1, n, 8), torch.randn(1, n, 2, 16)
    with torch.no_grad():
        pooled = pool(hidden, reads)[0]
        pool.reset()
        pool(hidden[:, :-1], reads[:, :-1])
        cached = pool(hidden[:, -1:], reads[:, -1:])[0, 0]
    for t in range(n):
        torch.testing.assert_close(pooled[t], reads[0, : t + 1].flatten(0, 1).mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, pooled[-1], atol=1e-5, rtol=0)


def test_a_value_is_copied_whole_from_one_match(copy_graft, monkeypatch):
    """Both queries of every position match one written token; the first position takes that match, each
    later one goes on from the previous (g = 1): the generation is the value written after the match token
    by token, a repeated token included (where reading by the current token would loop)."""
    graft = copy_graft(gate_init=20.0, boost=1000.0)
    vocab = graft.backbone.embedding.weight.shape[0]
    value = (torch.randperm(vocab - 10)[:3] + 10).tolist()
    state = graft.memorize(input_ids=torch.tensor([[7, 8, value[0], value[1], value[0], value[2], 9]]))
    slot = int((state["order"][0] == 1).nonzero())  # where the token 8 was written (its value: the token after it)
    one_hot = torch.nn.functional.one_hot(torch.tensor(slot), state["order"].shape[1]).float()
    monkeypatch.setattr(graft.memory, "attend", lambda q, state: one_hot.expand(*q.shape[:2], -1)[:, None].expand(-1, 2, -1, -1))
    calls = iter(range(100))
    monkeypatch.setattr(graft.injector.follow, "forward", lambda x: torch.full((*x.shape[:2], 1), -100.0 if next(calls) == 0 else 100.0))
    ids = torch.tensor([[8]])
    out = graft.generate(ids, state, torch.ones_like(ids), max_new_tokens=4)
    assert out[0, -4:].tolist() == [value[0], value[1], value[0], value[2]]


def test_merged_heads_read_any_match_or_only_a_shared_one():
    """Head 1 reads slots 0 and 1, head 2 slots 2 and 1 (each leaves 0.1 to the empty slot): the mean reads
    the three alike, the product only slot 1, the one both heads match, in proportion to the empty slot as
    both heads have it; heads that match nothing give a product that reads nothing."""
    weights = torch.tensor([[0.6, 0.3, 0.0, 0.0], [0.0, 0.3, 0.6, 0.0]])[None, :, None]  # b h n s
    torch.testing.assert_close(merge_heads(weights, "mean")[0, 0], torch.tensor([0.3, 0.3, 0.3, 0.0]))
    torch.testing.assert_close(merge_heads(weights, "product")[0, 0], torch.tensor([0.0, 0.9, 0.0, 0.0]), atol=1e-6, rtol=0)
    assert merge_heads(torch.zeros(1, 2, 1, 4), "product").abs().max() < 1e-6


def test_the_abstain_read_answers_where_the_question_matches_nothing(copy_graft):
    graft = copy_graft(gate_init=20.0, boost=1000.0)
    with torch.no_grad():
        graft.memory.null.fill_(100.0)  # every query reads the empty slot
        graft.injector.abstain.copy_(graft.backbone.embedding.weight[42])
    state = graft.memorize(["Mary went to the kitchen."])
    ids, mask = question(graft, ["What is the capital of France?"])
    assert graft.generate(ids, state, mask, max_new_tokens=1)[0, -1].item() == 42
    empty = graft.generate(ids, graft.init_state(1), mask, max_new_tokens=1)
    assert empty[0, -1].item() == bare_logits(graft, ids, mask)[0, -1].argmax().item()  # an empty memory: the backbone


def test_a_memory_that_does_not_hold_input_embeddings_is_refused(tiny_backbone):
    backbone = tiny_backbone("llama")
    memory = make_memory("linear", backbone.hidden_size)
    injector = graftkit.create("injector", "copy", hidden_size=backbone.hidden_size, num_layers=backbone.num_layers, layer=0)
    graft = Graft(backbone, memory, injector)
    try:
        ids, mask = question(graft, ["Where is Mary?"])
        with pytest.raises(graftkit.GraftkitError, match="needs memory.kind episodic with values: input"):
            graft(ids, graft.memorize(["Mary went to the kitchen."]), mask)
    finally:
        graft.injector.detach()


def test_the_window_mixes_the_last_input_embeddings_and_skips_padding(copy_graft):
    graft = copy_graft(window=3)
    injector = graft.injector
    tokens = torch.randn(2, 5, graft.backbone.hidden_size)
    injector.pool.mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    with torch.no_grad():
        injector.window.copy_(torch.arange(1.0, 4.0)[:, None].expand_as(injector.window))  # row j: j tokens back
        mixed = injector.window_mix(tokens)
    real = tokens * injector.pool.mask[..., None]
    for t in range(5):
        expected = sum((j + 1) * real[:, t - j] for j in range(3) if t - j >= 0)
        torch.testing.assert_close(mixed[:, t], expected, atol=1e-5, rtol=0)


def test_a_left_padded_row_reads_as_it_does_alone(copy_graft):
    graft = copy_graft(gate_init=4.0)
    with torch.no_grad():
        graft.injector.follow.bias.fill_(0.0)  # half of each position carried on: padding would leak in if it took any
    story = "Mary went to the kitchen. Sandra took the apple to the office."
    ids, mask = question(graft, ["Where is Mary?", "Where is the football now, and who took it?"])
    alone_ids, alone_mask = question(graft, ["Where is Mary?"])
    with torch.no_grad():
        batched = graft(ids, graft.memorize([story, story]), mask).logits[0, -alone_ids.shape[1] :]
        alone = graft(alone_ids, graft.memorize([story]), alone_mask).logits[0]
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


def test_the_graft_holds_no_backbone_tensor_and_exports(copy_graft, tmp_path):
    """The injector reads the backbone's embeddings, but they are not graft tensors: checkpoints and exports hold
    the graft's own weights only, and an export loads back."""
    from graftkit.export import export_graft, load_graft

    graft = copy_graft()
    names = set(graft.graft_state_dict())
    assert names and all(n.startswith(("memory.", "injector.")) for n in names)
    backbone = {t.data_ptr() for t in graft.backbone.model.state_dict().values()}
    assert not any(t.data_ptr() in backbone for t in graft.graft_state_dict().values())
    out = export_graft(graft, tmp_path / "export")
    graft.injector.detach()
    loaded = load_graft(out, backbone=graft.backbone)
    try:
        assert set(loaded.graft_state_dict()) == names
    finally:
        loaded.injector.detach()
