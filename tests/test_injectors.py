"""Injectors: every injector × every memory × every tiny backbone family, plus one NF4 backbone per injector.

What a graft must guarantee whatever the injector: gradients reach the graft and never the frozen
backbone; an empty memory (and, for injectors without a soft prompt, a closed gate) leaves the bare
backbone's logits; detaching restores the bare backbone exactly; cached and uncached greedy decoding
agree on left-padded batches; different memories give different answers; nothing of the backbone is
trained or exported. Tiny random backbones (hidden 64, 2 layers, byte-level tokenizer) keep it fast.
"""

from __future__ import annotations

import pytest
import torch
from graftkit.injectors.multi_layer import default_layers
from graftkit.injectors.xattn import TanhGate
from matrix import ALL_BACKBONES, ALL_INJECTORS, ALL_MEMORIES, make_memory

import graftkit
from graftkit.api import graft_from_configs
from graftkit.errors import GraftkitError, RecipeError
from graftkit.graft import Graft, pad
from graftkit.state import MemoryState

SMALL = {"num_tokens": 4}  # injector options that keep the matrix fast
PROMPTED = {"layer0_soft_prompt"}  # soft prompt: visible (so not the identity) once the memory holds something
CONTEXTS = ["Mary went to the kitchen. John moved to the garden.", "Sandra took the apple. Daniel went back to the office."]
QUESTIONS = ["Where is Mary?", "Where is the football now?"]

MATRIX = [
    pytest.param((injector, memory, family, None), id=f"{injector}-{memory}-{family}")
    for injector in ALL_INJECTORS
    for memory in ALL_MEMORIES
    for family in ALL_BACKBONES
] + [pytest.param((injector, ALL_MEMORIES[0], "llama", "nf4"), id=f"{injector}-{ALL_MEMORIES[0]}-llama-nf4") for injector in ALL_INJECTORS]


@pytest.fixture
def build(tiny_backbone):
    """build(injector, memory, family, quantize, dtype, **injector_options) -> Graft; detached after the test."""
    grafts: list[Graft] = []

    def make(injector: str, memory: str, family: str, quantize: str | None = None, dtype: str = "float32", **options) -> Graft:
        backbone = tiny_backbone(family, quantize, dtype)
        torch.manual_seed(0)
        mem = make_memory(memory, backbone.hidden_size)
        inj = graftkit.create("injector", injector, hidden_size=backbone.hidden_size, num_layers=backbone.num_layers, **{**SMALL, **options})
        grafts.append(Graft(backbone, mem, inj))
        return grafts[-1]

    yield make
    for graft in grafts:
        graft.injector.detach()


@pytest.fixture(params=MATRIX)
def spec(request) -> tuple:
    """(injector, memory, backbone family, quantize) of one matrix cell."""
    return request.param


@pytest.fixture
def graft(spec, build) -> Graft:
    return build(*spec)


def open_gates(graft: Graft, value: float = 1.0) -> None:
    """Set every gate's bias (its pre-activation while the zero-initialised weights are untouched)."""
    gates = [m for m in graft.injector.modules() if isinstance(m, TanhGate)]
    assert gates, "injector has no TanhGate"
    with torch.no_grad():
        for gate in gates:
            gate.bias.fill_(value)


def ids_of(graft: Graft, texts, side: str = "left"):
    backbone = graft.backbone
    return pad([backbone.text_ids(t) for t in texts], backbone.tokenizer.pad_token_id, side=side, device=backbone.device)


def random_ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (batch, length), generator=generator)


@torch.no_grad()
def bare_logits(graft: Graft, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return graft.backbone.model(input_ids=ids, attention_mask=mask).logits


def backbone_hooks(backbone) -> int:
    """Forward (pre-)hooks registered anywhere in the backbone."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in backbone.model.modules())


# -- training -------------------------------------------------------------------------------------------
def test_forward_backward_trains_only_the_graft(graft):
    backbone = graft.backbone
    assert backbone.trainable_parameters() == []
    assert not any(p.requires_grad for p in backbone.model.parameters())
    ids, mask = ids_of(graft, QUESTIONS)
    labels = ids.masked_fill(mask == 0, -100)

    out = graft(ids, graft.memorize(CONTEXTS), mask, labels)
    assert out.logits.shape[0] == 2 and out.logits.shape[-1] == backbone.model.config.vocab_size
    assert out.logits.shape[1] <= ids.shape[1]  # input positions only: never the injector's soft prompt
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in backbone.model.parameters())
    gate_grads = [m.bias.grad for m in graft.injector.modules() if isinstance(m, TanhGate)]
    assert all(g is not None and g.abs().sum() > 0 for g in gate_grads), "closed gates must still learn to open"

    graft.zero_grad(set_to_none=True)
    open_gates(graft)
    graft(ids, graft.memorize(CONTEXTS), mask, labels).loss.backward()
    assert all(p.grad is None for p in backbone.model.parameters())
    flowing = {n for n, p in graft.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("memory.") for n in flowing), "no gradient reached the memory through the backbone"
    assert "injector.memory_tokens.queries" in flowing


def test_no_backbone_tensor_is_trained_or_exported(graft):
    backbone_tensors = [*graft.backbone.model.parameters(), *graft.backbone.model.buffers()]
    ids = {id(t) for t in backbone_tensors}
    pointers = {t.data_ptr() for t in backbone_tensors if t.numel()}
    trainable = graft.trainable_parameters()
    assert trainable and not any(id(p) in ids or p.data_ptr() in pointers for p in trainable)
    assert len(trainable) == len(list(graft.memory.parameters())) + len(list(graft.injector.parameters()))
    exported = graft.graft_state_dict()
    assert any(k.startswith("injector.") for k in exported) and any(k.startswith("memory.") for k in exported)
    assert all(k.startswith(("memory.", "injector.", "write_norm.")) for k in exported), sorted(exported)
    assert not any(t.data_ptr() in pointers for t in exported.values() if t.numel())


# -- identity -------------------------------------------------------------------------------------------
def test_empty_memory_is_the_bare_backbone(graft):
    open_gates(graft)  # even open gates must leave rows with an empty memory alone
    ids = random_ids()
    bare = graft.backbone.model(input_ids=ids, labels=ids)
    with torch.no_grad():
        out = graft(ids, graft.init_state(2), labels=ids)
    torch.testing.assert_close(out.logits, bare.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, bare.loss, atol=1e-5, rtol=0)  # label shift past the soft prompt

    # rows are independent: an empty row next to a written one is still the bare backbone
    state = MemoryState.stack([graft.init_state(1), graft.memorize(CONTEXTS[:1])])
    with torch.no_grad():
        mixed = graft(ids, state).logits
    torch.testing.assert_close(mixed[0], bare.logits[0], atol=1e-5, rtol=0)
    assert (mixed[1] - bare.logits[1]).abs().max() > 1e-3


def test_closed_gate(graft):
    """At init (gates closed) the gated path adds nothing: mid/multi-layer grafts are the bare backbone
    even with a written memory; layer0's embeddings are untouched and only its soft prompt speaks."""
    ids = random_ids()
    state = graft.memorize(CONTEXTS)
    with torch.no_grad():
        logits = graft(ids, state).logits
        with graft.injector.reading(graft.memory, state):
            embeds = graft.backbone.embedding(ids)
    assert torch.equal(embeds, graft.backbone.embedding(ids))
    if graft.injector.name in PROMPTED:
        assert (logits - bare_logits(graft, ids)).abs().max() > 1e-3
    else:
        torch.testing.assert_close(logits, bare_logits(graft, ids), atol=1e-5, rtol=0)


def test_detach_restores_the_bare_backbone(spec, build, tiny_backbone):
    injector, memory, family, quantize = spec
    backbone = tiny_backbone(family, quantize)
    ids = random_ids()
    hooks = backbone_hooks(backbone)
    with torch.no_grad():
        reference = backbone.model(input_ids=ids).logits  # before attaching

    graft = build(*spec)
    assert backbone_hooks(backbone) > hooks
    assert torch.equal(bare_logits(graft, ids), reference)  # attached but not reading: hooks do nothing
    open_gates(graft)
    with torch.no_grad():
        grafted = graft(ids, graft.memorize(CONTEXTS)).logits
    assert (grafted - reference).abs().max() > 1e-3
    graft.injector.detach()
    assert backbone_hooks(backbone) == hooks and not graft.injector.attached
    assert torch.equal(bare_logits(graft, ids), reference)


# -- generation and recall ---------------------------------------------------------------------------------
def test_cached_generation_matches_uncached(graft):
    open_gates(graft, 1.0)
    state = graft.memorize(CONTEXTS)
    ids, mask = ids_of(graft, QUESTIONS, side="left")
    assert mask[0, 0] == 0 and mask[1, 0] == 1  # rows of different lengths, left-padded
    cached = graft.generate(ids, state, mask, max_new_tokens=6, use_cache=True)
    uncached = graft.generate(ids, state, mask, max_new_tokens=6, use_cache=False)
    assert cached.shape[0] == 2 and cached.shape[1] >= 1
    assert torch.equal(cached, uncached)
    prefix = graft.backbone.text_ids("Answer in one word. ")  # a shared prefix the bare backbone computes once
    with_prefix = graft.generate(ids, state, mask, max_new_tokens=6, use_cache=True, prefix_ids=prefix)
    assert torch.equal(with_prefix, graft.generate(ids, state, mask, max_new_tokens=6, use_cache=False, prefix_ids=prefix))

    # and decoding sees what training sees: a teacher-forced forward over question + answer picks the
    # same tokens (up to each row's end of sequence), so new tokens get the injection too
    eos = graft.backbone.tokenizer.eos_token_id
    full = torch.cat([ids, cached[:, :-1]], dim=1)
    with torch.no_grad():
        logits = graft(full, state, torch.cat([mask, torch.ones_like(cached[:, :-1])], dim=1)).logits
    picked = logits[:, ids.shape[1] - 1 :].argmax(-1)
    for row in range(2):
        stop = (cached[row] == eos).nonzero()
        end = int(stop[0]) + 1 if len(stop) else cached.shape[1]
        assert torch.equal(picked[row, :end], cached[row, :end])


def test_left_padding_is_transparent(graft):
    """A padded row's logits equal the same row run alone: masks and positions survive the injector."""
    open_gates(graft, 1.0)
    state = graft.memorize(CONTEXTS)
    ids, mask = ids_of(graft, QUESTIONS, side="left")
    with torch.no_grad():
        batch = graft(ids, state, mask).logits
        for row, question in enumerate(QUESTIONS):
            alone_ids, _ = ids_of(graft, [question])
            alone = graft(alone_ids, state.select(row)).logits[0]
            torch.testing.assert_close(batch[row, -alone.shape[0] :], alone, atol=1e-4, rtol=0)


def test_the_memory_matters(graft):
    open_gates(graft, 1.0)
    ids, mask = ids_of(graft, QUESTIONS[:1])
    with torch.no_grad():
        first = graft(ids, graft.memorize(CONTEXTS[:1]), mask).logits
        second = graft(ids, graft.memorize(CONTEXTS[1:]), mask).logits
        again = graft(ids, graft.memorize(CONTEXTS[:1]), mask).logits
    assert (first - second).abs().max() > 1e-3
    torch.testing.assert_close(first, again, atol=1e-6, rtol=0)


VARIANTS = [
    ("layer0_soft_prompt", {"direct_read": False}),
    ("layer0_soft_prompt", {"gate": "channel"}),
    ("mid_layer", {"direct_read": False, "gate": "scalar", "layer": 0}),  # memory tokens alone (SMALL's 4)
    ("mid_layer", {"num_tokens": 0, "layer": 0}),  # each position's own read alone
    ("multi_layer_xattn", {"gate": "channel", "layers": [-1]}),
]


@pytest.mark.parametrize("injector, options", VARIANTS, ids=[f"{i}-{o}" for i, o in VARIANTS])
def test_option_variants_keep_the_guarantees(build, injector, options):
    """Non-default gates and reads: still the identity on an empty memory, still cache-consistent, still trained."""
    graft = build(injector, ALL_MEMORIES[0], "llama", **options)
    open_gates(graft, 1.0)
    ids = random_ids()
    with torch.no_grad():
        empty = graft(ids, graft.init_state(2)).logits
    torch.testing.assert_close(empty, bare_logits(graft, ids), atol=1e-5, rtol=0)
    state = graft.memorize(CONTEXTS)
    questions, mask = ids_of(graft, QUESTIONS)
    cached = graft.generate(questions, state, mask, max_new_tokens=5, use_cache=True)
    assert torch.equal(cached, graft.generate(questions, state, mask, max_new_tokens=5, use_cache=False))
    graft(ids, graft.memorize(CONTEXTS), labels=ids).loss.backward()
    to_query = getattr(graft.injector, "to_query", None)
    if getattr(graft.injector.config, "direct_read", False):
        assert to_query is not None and to_query.weight.grad.abs().sum() > 0
    else:
        assert to_query is None


# -- recipes and configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("memory", ALL_MEMORIES)
@pytest.mark.parametrize("injector", ALL_INJECTORS)
def test_graft_from_configs(tiny_backbone, injector, memory):
    backbone = tiny_backbone("qwen2")
    options = make_memory(memory, backbone.hidden_size).config.model_dump(exclude={"dim"})
    graft = graft_from_configs(backbone, memory, options, injector, {"gate_init": 0.0})
    try:
        assert isinstance(graft.injector, graftkit.components("injector")[injector])
        assert graft.injector.config == type(graft.injector).Config(gate_init=0.0)  # every option not given: its default
        ids = random_ids()
        with torch.no_grad():
            out = graft(ids, graft.init_state(2))
        torch.testing.assert_close(out.logits, bare_logits(graft, ids), atol=1e-5, rtol=0)
    finally:
        graft.injector.detach()


@pytest.mark.parametrize("injector", ALL_INJECTORS)
def test_config_fields_are_documented(injector):
    config = graftkit.components("injector")[injector].Config
    assert config.model_config.get("extra") == "forbid"
    for name, field in config.model_fields.items():
        assert field.description, f"{injector}.{name} has no description"


def create(injector: str, num_layers: int = 2, hidden_size: int = 64, **options):
    return graftkit.create("injector", injector, hidden_size=hidden_size, num_layers=num_layers, **options)


def test_layer_defaults_and_negative_indices():
    assert create("mid_layer").layer == 1
    assert create("mid_layer", num_layers=30).layer == 15
    assert create("mid_layer", num_layers=30, layer=-1).layer == 29
    assert default_layers(30) == [6, 12, 18, 24]
    assert create("multi_layer_xattn", num_layers=30).layers == [6, 12, 18, 24]
    assert create("multi_layer_xattn").layers == [0, 1]
    assert create("multi_layer_xattn", num_layers=30, layers=[20, -1, 3]).layers == [3, 20, 29]
    assert sorted(create("multi_layer_xattn", num_layers=30, layers=[3, 20]).blocks) == ["20", "3"]


@pytest.mark.parametrize("injector", ALL_INJECTORS)
def test_attention_width_is_heads_times_dim_head(injector):
    """Projections are heads·dim_head wide, whatever the hidden size (3 heads of 20 on a width of 64)."""
    made = create(injector, heads=3, dim_head=20)
    shapes = {tuple(m.to_kv.weight.shape) for m in made.modules() if hasattr(m, "to_kv")}
    assert shapes == {(2 * 3 * 20, 64)}


@pytest.mark.parametrize(
    "injector, options, message",
    [
        ("mid_layer", {"layer": 2}, r"injector\.layer: layer 2 is outside 0\.\.1 .*2 decoder layers"),
        ("mid_layer", {"layer": -3}, r"injector\.layer: layer -3 is outside"),
        ("multi_layer_xattn", {"layers": [0, 7]}, r"injector\.layers: layer 7 is outside 0\.\.1"),
        ("multi_layer_xattn", {"layers": [1, -1]}, r"injector\.layers: layer\(s\) \[1\] listed more than once"),
    ],
)
def test_backbone_dependent_mistakes_are_messages(injector, options, message):
    with pytest.raises(GraftkitError, match=message):
        create(injector, **options)


@pytest.mark.parametrize(
    "injector, options, path",
    [
        ("multi_layer_xattn", {"layers": []}, "injector.layers"),
        ("mid_layer", {"gate": "vector"}, "injector.gate"),
        ("layer0_soft_prompt", {"num_tokens": 0}, "injector.num_tokens"),
        ("mid_layer", {"num_tokens": 0, "direct_read": False}, "injector"),  # the message names both fields
        ("mid_layer", {"direct_read": False}, "injector"),  # no memory tokens by default: one of them is needed
        ("layer0_soft_prompt", {"num_token": 8}, "injector.num_token"),
    ],
)
def test_invalid_options_name_the_field(injector, options, path):
    with pytest.raises(RecipeError) as info:
        create(injector, **options)
    assert any(p == path for p, _ in info.value.problems), info.value.problems


@pytest.mark.parametrize("injector", ALL_INJECTORS)
def test_attach_checks_the_backbone(tiny_backbone, injector):
    backbone = tiny_backbone("llama")
    wrong_width = create(injector, hidden_size=32)
    with pytest.raises(GraftkitError, match="hidden size 32"):
        wrong_width.attach(backbone)
    wrong_depth = create(injector, num_layers=4)
    with pytest.raises(GraftkitError, match="4 decoder layers"):
        wrong_depth.attach(backbone)
    injector_ = create(injector)
    injector_.attach(backbone)
    try:
        with pytest.raises(GraftkitError, match="already attached"):
            injector_.attach(backbone)
    finally:
        injector_.detach()


def test_soft_prompt_looks_like_embeddings(build):
    graft = build("layer0_soft_prompt", ALL_MEMORIES[0], "llama")
    norms = graft.backbone.embedding.weight.float().norm(dim=-1)
    assert graft.injector.embed_norm.item() == pytest.approx(norms.median().item())
    state = graft.memorize(CONTEXTS)
    ids, mask = ids_of(graft, QUESTIONS)
    with graft.injector.reading(graft.memory, state):
        prompt = graft.injector.prompt()
        embeds, full_mask = graft.injector.prepare_inputs(graft.backbone.embedding(ids), mask)
    assert prompt.shape == (2, SMALL["num_tokens"], graft.backbone.hidden_size)
    torch.testing.assert_close(prompt.norm(dim=-1), torch.full((2, SMALL["num_tokens"]), norms.median().item()))
    assert embeds.shape[1] == ids.shape[1] + SMALL["num_tokens"] and torch.equal(full_mask[:, SMALL["num_tokens"] :], mask)
    assert full_mask[:, : SMALL["num_tokens"]].eq(1).all()
    with graft.injector.reading(graft.memory, graft.init_state(2)):  # empty rows: prompt masked out
        _, empty_mask = graft.injector.prepare_inputs(graft.backbone.embedding(ids), mask)
    assert empty_mask[:, : SMALL["num_tokens"]].eq(0).all()


# -- NF4 ----------------------------------------------------------------------------------------------------------
def test_nf4_gradients_survive_inference():
    """Gradients into the graft through an NF4 backbone are the same before and after a no-grad forward."""
    from graftkit.backbones.hf import LlamaBackbone

    backbone = LlamaBackbone(LlamaBackbone.Config(source="tiny-random", quantize="nf4"))  # fresh: never run
    torch.manual_seed(0)
    graft = Graft(backbone, make_memory(ALL_MEMORIES[0], backbone.hidden_size), create("mid_layer", layer=0, **SMALL))
    open_gates(graft)
    ids = random_ids()

    def grads() -> torch.Tensor:
        graft.zero_grad(set_to_none=True)
        graft(ids, graft.memorize(CONTEXTS), labels=ids).loss.backward()
        return graft.injector.memory_tokens.queries.grad.clone()

    try:
        first = grads()
        with torch.no_grad():
            backbone.model(input_ids=ids)
        torch.testing.assert_close(grads(), first)
    finally:
        graft.injector.detach()


# -- bfloat16 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("injector", ALL_INJECTORS)
def test_bfloat16_backbone(build, injector):
    """float32 graft on a bf16 backbone: casts at the boundaries, float32 gradients, identity at init."""
    graft = build(injector, ALL_MEMORIES[0], "qwen2", None, dtype="bfloat16")
    assert graft.backbone.dtype == torch.bfloat16
    ids = random_ids()
    with torch.no_grad():
        empty = graft(ids, graft.init_state(2)).logits
        closed = graft(ids, graft.memorize(CONTEXTS)).logits
    assert empty.dtype == torch.bfloat16
    # a soft prompt changes the sequence length, so bf16 rounding differs slightly even when masked out
    torch.testing.assert_close(empty, bare_logits(graft, ids), atol=2e-2 if injector in PROMPTED else 0, rtol=0)
    if injector not in PROMPTED:
        assert torch.equal(closed, bare_logits(graft, ids))
    open_gates(graft)
    graft(ids, graft.memorize(CONTEXTS), labels=ids).loss.backward()
    queries = graft.injector.memory_tokens.queries
    assert queries.dtype == torch.float32 and queries.grad is not None and queries.grad.abs().sum() > 0
