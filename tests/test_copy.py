"""The copy injector with an episodic memory of input embeddings: the logits it raises are the recalled token's."""

from __future__ import annotations

import pytest
import torch
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


def test_an_empty_memory_keeps_the_backbone_and_cached_generation_matches(copy_graft):
    graft = copy_graft(gate_init=4.0)
    ids, mask = question(graft, ["Where is Mary?", "Where is the football now?"])
    with torch.no_grad():
        empty = graft(ids, graft.init_state(2), mask).logits
    torch.testing.assert_close(empty, bare_logits(graft, ids, mask), atol=1e-5, rtol=0)
    state = graft.memorize(["Mary went to the kitchen.", "Sandra took the apple to the office."])
    cached = graft.generate(ids, state, mask, max_new_tokens=5, use_cache=True)
    assert torch.equal(cached, graft.generate(ids, state, mask, max_new_tokens=5, use_cache=False))


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
    for name in ("injector.to_query.weight", "injector.pool.to_q.weight", "injector.gate.weight", "injector.stop.weight", "memory.to_keys.weight",
                 "memory.to_queries.weight", "memory.to_beta.weight"):
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
    own = graft.injector.pool.past[1][0, :, 1]  # the token reads of the two positions
    assert graft.injector.scores(own).argmax(-1).tolist() == [int(written[2]), int(written[4])]
