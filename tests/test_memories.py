"""Memory contract tests, run for every memory of the matrix, plus exact references for the
chunked algorithms (titans: per-token gradients at chunk start; linear: token-by-token delta rule).

The recall test relies on what the built-in memories share: `to_keys` / `to_queries` projections (tied
for the test) and `recall_target(x)`, the read a perfect memory would return at a written `x`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from graftkit.memories.linear import LinearMemory
from graftkit.memories.titans import TitansMemory
from matrix import ALL_MEMORIES, make_memory, memory_class
from pydantic import ValidationError
from torch.func import functional_call, grad

from graftkit.errors import GraftkitError, StateError
from graftkit.state import MemoryState

DIM = 32


def assert_states_equal(a: MemoryState, b: MemoryState, **tolerance) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, name=name: f"state tensor {name}: {m}", **tolerance)


def relative_error(memory, x: torch.Tensor, state: MemoryState) -> float:
    target = memory.recall_target(x)
    return ((memory.read(x, state) - target).square().sum() / target.square().sum()).item()


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MEMORIES)
def test_config_fields_are_described_bounded_and_strict(name):
    cls = memory_class(name)
    for field, info in cls.Config.model_fields.items():
        assert info.description, f"{name}.{field} has no description"
    with pytest.raises(ValidationError):
        cls.Config(dim=DIM, no_such_field=1)
    with pytest.raises(ValidationError):
        cls.Config(dim=DIM, heads=0)
    with pytest.raises(GraftkitError, match="needs a width"):
        cls(cls.Config())


# -- shapes and functional updates -------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MEMORIES)
def test_shapes_batch_first_and_write_is_functional(name):
    memory = make_memory(name, DIM)
    state = memory.init_state(3)
    assert all(t.shape[0] == 3 for t in state.tensors.values())
    assert state.is_empty.all()
    before = state.clone()
    x = torch.randn(3, 13, DIM)
    new = memory.write(x, state)
    assert_states_equal(state, before, rtol=0, atol=0)  # the old state is untouched
    assert new.tokens_written.tolist() == [13, 13, 13]
    assert all(t.shape == state[k].shape for k, t in new.tensors.items())
    assert memory.read(torch.randn(3, 5, DIM), new).shape == (3, 5, DIM)


@pytest.mark.parametrize("name", ALL_MEMORIES)
def test_empty_write_is_a_no_op(name):
    memory = make_memory(name, DIM)
    state = memory.init_state(2)
    assert_states_equal(memory.write(torch.randn(2, 0, DIM), state), state, rtol=0, atol=0)


# -- recall ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MEMORIES)
@pytest.mark.parametrize("tokens", [5, 8])  # shorter than a chunk (8), and exactly one chunk
def test_untrained_memory_recalls_what_was_written(name, tokens):
    """Queries projected like keys: reading at the written inputs must come much closer to their
    values (`recall_target`) than reading an empty memory does. Fails if write() stores nothing."""
    memory = make_memory(name, DIM)
    with torch.no_grad():
        memory.to_queries.weight.copy_(memory.to_keys.weight)
        x = torch.randn(3, tokens, DIM)
        empty = memory.init_state(3)
        written = memory.write(x, empty)
        assert any(not torch.equal(written[k], empty[k]) for k in empty.tensors if k != "tokens_written")
        err_written, err_empty = relative_error(memory, x, written), relative_error(memory, x, empty)
    assert err_written < 0.75 * err_empty, (err_written, err_empty)


@pytest.mark.parametrize("name", ALL_MEMORIES)
def test_final_partial_chunk_is_written(name):
    memory = make_memory(name, DIM)
    x = torch.randn(2, 13, DIM)  # one chunk of 8 and a partial chunk of 5
    with torch.no_grad():
        whole = memory.write(x, memory.init_state(2))
        first_chunk = memory.write(x[:, :8], memory.init_state(2))
    assert not torch.allclose(whole[next(iter(whole.tensors))], first_chunk[next(iter(first_chunk.tensors))])


# -- chunking --------------------------------------------------------------------------------------
def assert_split_write_equals_one_write(memory, split: int) -> None:
    """Writing 21 tokens in two calls (the first `split` tokens, then the rest) gives the one-call state."""
    x = torch.randn(2, 21, DIM)
    with torch.no_grad():
        whole = memory.write(x, memory.init_state(2))
        parts = memory.write(x[:, split:], memory.write(x[:, :split], memory.init_state(2)))
    assert_states_equal(whole, parts, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL_MEMORIES)
@pytest.mark.parametrize("split", [8, 16])  # chunk boundaries (chunk_size 8)
def test_split_write_at_chunk_boundary_equals_one_write(name, split):
    assert_split_write_equals_one_write(make_memory(name, DIM), split)


@pytest.mark.parametrize("split", [1, 3, 11])
def test_linear_memory_split_anywhere_equals_one_write(split):
    assert_split_write_equals_one_write(make_memory("linear", DIM), split)


# -- masks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MEMORIES)
@pytest.mark.parametrize("masked", [3, 12])  # inside the last chunk; a whole chunk and more
def test_masked_tail_equals_shorter_write(name, masked):
    memory = make_memory(name, DIM)
    x = torch.randn(2, 21, DIM)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[:, -masked:] = False
    with torch.no_grad():
        with_mask = memory.write(x, memory.init_state(2), mask)
        shorter = memory.write(x[:, :-masked], memory.init_state(2))
    assert_states_equal(with_mask, shorter, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL_MEMORIES)
def test_masked_positions_do_not_change_the_state(name):
    memory = make_memory(name, DIM)
    x = torch.randn(2, 21, DIM)
    mask = torch.rand(2, 21) > 0.4
    other = torch.where(mask.unsqueeze(-1), x, 10 * torch.randn_like(x))
    with torch.no_grad():
        state = memory.write(torch.randn(2, 4, DIM), memory.init_state(2))
        a, b = memory.write(x, state, mask), memory.write(other, state, mask)
        nothing = memory.write(x, state, torch.zeros(2, 21, dtype=torch.bool))
    assert_states_equal(a, b, rtol=1e-5, atol=1e-6)
    assert a.tokens_written.tolist() == (mask.sum(-1) + 4).tolist()
    assert_states_equal(nothing, state, rtol=0, atol=0)


# -- gradients -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MEMORIES)
def test_gradients_reach_every_parameter(name):
    memory = make_memory(name, DIM)
    x, q = torch.randn(2, 21, DIM), torch.randn(2, 6, DIM)  # three chunks, the last one partial
    state = memory.write(x, memory.init_state(2))
    memory.read(q, state).square().mean().backward()
    for param_name, param in memory.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} got a zero gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} got a non-finite gradient"


def test_titans_truncated_chunks_keep_the_state_and_every_gradient():
    plain, truncated = make_memory("titans", DIM), make_memory("titans", DIM, truncate_chunks=True)
    truncated.load_state_dict(plain.state_dict())
    x = torch.randn(2, 21, DIM)
    a, b = plain.write(x, plain.init_state(2)), truncated.write(x, truncated.init_state(2))
    assert_states_equal(a.detach(), b.detach())
    truncated.read(x, b).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in truncated.parameters())


# -- state files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MEMORIES)
def test_state_save_load_round_trip_is_exact(name, tmp_path):
    memory = make_memory(name, DIM)
    with torch.no_grad():
        state = memory.write(torch.randn(2, 13, DIM), memory.init_state(2))
    loaded = MemoryState.load(state.save(tmp_path / "state.safetensors"), expect=memory.identity)
    assert_states_equal(loaded, state, rtol=0, atol=0)
    assert loaded.metadata == state.metadata
    q = torch.randn(2, 4, DIM)
    with torch.no_grad():
        assert torch.equal(memory.read(q, loaded), memory.read(q, state))


@pytest.mark.parametrize("name", ALL_MEMORIES)
def test_state_of_another_kind_or_config_is_refused(name, tmp_path):
    memory = make_memory(name, DIM)
    other_kind = make_memory(next(n for n in ALL_MEMORIES if n != name), DIM)
    path = other_kind.init_state(1).save(tmp_path / "other_kind.safetensors")
    with pytest.raises(StateError, match="memory kind"):
        MemoryState.load(path, expect=memory.identity)
    with pytest.raises(StateError):
        memory.write(torch.randn(1, 3, DIM), MemoryState.load(path))
    other_config = make_memory(name, DIM, heads=1)
    path = other_config.init_state(1).save(tmp_path / "other_config.safetensors")
    with pytest.raises(StateError, match="memory config"):
        MemoryState.load(path, expect=memory.identity)


# -- user errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MEMORIES)
def test_wrong_shapes_are_clear_errors(name):
    memory = make_memory(name, DIM)
    state = memory.init_state(2)
    with pytest.raises(GraftkitError, match="last dimension is 31"):
        memory.write(torch.randn(2, 5, DIM - 1), state)
    with pytest.raises(GraftkitError, match="last dimension"):
        memory.read(torch.randn(2, 5, DIM + 1), state)
    with pytest.raises(GraftkitError, match="batch of 3 rows"):
        memory.write(torch.randn(3, 5, DIM), state)
    with pytest.raises(GraftkitError, match="batch of 1 rows"):
        memory.read(torch.randn(1, 5, DIM), state)
    with pytest.raises(GraftkitError, match="expected a"):
        memory.read(torch.randn(5, DIM), state)
    with pytest.raises(GraftkitError, match="mask has shape"):
        memory.write(torch.randn(2, 5, DIM), state, torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("name", ALL_MEMORIES)
def test_bfloat16_memory_writes_and_reads_like_float32(name):
    memory = make_memory(name, DIM)
    half = make_memory(name, DIM).to(torch.bfloat16)
    x = torch.randn(2, 21, DIM)
    with torch.no_grad():
        full_read = memory.read(x, memory.write(x, memory.init_state(2)))
        state = half.write(x.bfloat16(), half.init_state(2))
        half_read = half.read(x.bfloat16(), state)
    assert half_read.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for k, t in state.tensors.items() if k != "tokens_written")
    assert (half_read.float() - full_read).norm() < 0.1 * full_read.norm()


# -- determinism -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MEMORIES)
def test_same_seed_same_memory_same_results(name):
    a, b = make_memory(name, DIM, seed=3), make_memory(name, DIM, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    x, q = torch.randn(2, 13, DIM), torch.randn(2, 4, DIM)
    with torch.no_grad():
        sa, sb = a.write(x, a.init_state(2)), b.write(x, b.init_state(2))
        assert_states_equal(sa, sb, rtol=0, atol=0)
        assert torch.equal(a.read(q, sa), b.read(q, sb))


# -- exact references --------------------------------------------------------------------------------
def test_titans_chunk_update_matches_per_token_gradient_reference():
    """Chunk by chunk, token by token: each gradient at the chunk-start weights, summed with the
    (capped) per-token learning rates, then momentum and decay with the chunk's mean gates."""
    memory = make_memory("titans", DIM, heads=2, dim_head=8, chunk_size=4).double()
    with torch.no_grad():  # gates that vary from token to token
        memory.to_gates.weight.normal_(0.0, 0.5)
        memory.to_gates.bias.normal_(0.0, 1.0)
    cfg, b, n = memory.config, 2, 11
    x = torch.randn(b, n, DIM, dtype=torch.float64)
    mask = torch.rand(b, n) > 0.3
    got = memory.write(x, memory.init_state(b), mask)

    with torch.no_grad():
        keys = F.normalize(rearrange(memory.to_keys(x), "b n (h e) -> (b h) n e", h=cfg.heads), dim=-1)
        values = F.normalize(rearrange(memory.to_values(x), "b n (h e) -> (b h) n e", h=cfg.heads), dim=-1)
        lr, momentum, decay = rearrange(memory.to_gates(x), "b n (g h) -> g (b h) n", g=3)
        rows_mask = repeat(mask, "b n -> (b h) n", h=cfg.heads)
        initial = [repeat(w, "h i o -> (b h) i o", b=b) for w in memory.mlp.weights]

    def loss(params, key, value):
        return 0.5 * (functional_call(memory.mlp, params, (key,)) - value).square().sum()

    for row in range(b * cfg.heads):
        weights = [w[row] for w in initial]
        moments = [torch.zeros_like(w) for w in weights]
        for start in range(0, n, cfg.chunk_size):
            tokens = [t for t in range(start, min(n, start + cfg.chunk_size)) if rows_mask[row, t]]
            if not tokens:
                continue
            theta = cfg.max_lr * torch.sigmoid(lr[row, tokens])
            overlap = (keys[row, tokens] @ keys[row, tokens].T).abs()
            theta = theta / (overlap @ theta).max().clamp(min=1.0)
            params = {f"weights.{l}": w for l, w in enumerate(weights)}
            grads = [grad(loss)(params, keys[row, t][None], values[row, t][None]) for t in tokens]
            surprise = [-sum(th * g[f"weights.{l}"] for th, g in zip(theta, grads)) for l in range(len(weights))]
            eta = torch.sigmoid(momentum[row, tokens].mean())
            kept = 1 - torch.sigmoid(decay[row, tokens].mean())
            moments = [eta * s + u for s, u in zip(moments, surprise)]
            weights = [kept * w + s for w, s in zip(weights, moments)]
        for l in range(len(weights)):
            batch_row, head = divmod(row, cfg.heads)
            torch.testing.assert_close(got[f"w{l}"][batch_row, head], weights[l])
            torch.testing.assert_close(got[f"s{l}"][batch_row, head], moments[l])


def test_linear_chunkwise_delta_rule_matches_token_by_token_reference():
    memory = make_memory("linear", DIM, heads=2, dim_head=8, chunk_size=4).double()
    with torch.no_grad():
        memory.to_decay.weight.normal_(0.0, 1.0)
        memory.to_decay.bias.fill_(-1.0)
    b, n = 2, 11
    x = torch.randn(b, n, DIM, dtype=torch.float64)
    mask = torch.rand(b, n) > 0.3
    got = memory.write(x, memory.init_state(b), mask)
    with torch.no_grad():
        keys = F.normalize(rearrange(memory.to_keys(x), "b n (h e) -> b h n e", h=2), dim=-1)
        values = rearrange(memory.to_values(x), "b n (h e) -> b h n e", h=2)
        beta = rearrange(torch.sigmoid(memory.to_beta(x)), "b n h -> b h n")
        kept = rearrange(1 - torch.sigmoid(memory.to_decay(x)), "b n h -> b h n")
        w = torch.zeros(b, 2, 8, 8, dtype=torch.float64)
        for t in range(n):
            on = rearrange(mask[:, t].double(), "b -> b 1")
            a = kept[:, :, t] * on + (1 - on)
            decayed = rearrange(a, "b h -> b h 1 1") * w
            error = values[:, :, t] - torch.einsum("bhvk,bhk->bhv", decayed, keys[:, :, t])
            w = decayed + rearrange(beta[:, :, t] * on, "b h -> b h 1 1") * torch.einsum("bhv,bhk->bhvk", error, keys[:, :, t])
    torch.testing.assert_close(got["w"], w)


def test_titans_step_cap_keeps_correlated_writes_finite():
    """Hidden states share a large common direction; 64 nearly equal keys in one chunk would make
    the plain summed update overshoot without the cap."""
    memory = make_memory("titans", DIM, chunk_size=64, max_lr=3.0)
    x = 5 * torch.randn(1, 1, DIM) + 0.1 * torch.randn(2, 256, DIM)
    with torch.no_grad():
        state = memory.write(x, memory.init_state(2))
    for name, tensor in state.tensors.items():
        assert torch.isfinite(tensor.float()).all(), name
    assert max(state[f"w{l}"].abs().max().item() for l in range(memory.layers)) < 100


def test_memories_are_registered_under_their_names():
    assert [memory_class(n).name for n in ALL_MEMORIES] == ALL_MEMORIES
    assert memory_class("titans") is TitansMemory and memory_class("linear") is LinearMemory


# -- keys over several tokens (key_span) ----------------------------------------------------------------
SPANNING = ["titans", "linear"]


def spanning_memory(name: str, span: int = 3):
    memory = make_memory(name, DIM, key_span=span)
    with torch.no_grad():
        memory.key_mix.weight.normal_()  # not the identity it starts as
    return memory


@pytest.mark.parametrize("name", SPANNING)
def test_key_span_starts_as_the_single_token_memory(name):
    plain, spanning = make_memory(name, DIM, key_span=1), make_memory(name, DIM, key_span=4)
    spanning.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 13, DIM)
    with torch.no_grad():
        a, b = plain.write(x, plain.init_state(2)), spanning.write(x, spanning.init_state(2))
    for key in a.tensors:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.parametrize("name", SPANNING)
def test_key_span_empty_write_is_a_no_op(name):
    memory = spanning_memory(name)
    state = memory.write(torch.randn(2, 5, DIM), memory.init_state(2))  # a tail of written inputs to keep
    assert_states_equal(memory.write(torch.randn(2, 0, DIM), state), state, rtol=0, atol=0)


@pytest.mark.parametrize("name", SPANNING)
def test_keys_see_earlier_tokens(name):
    memory = spanning_memory(name)
    x = torch.randn(1, 9, DIM)
    changed = x.clone()
    changed[:, 3] += 1.0  # with span 3, the keys of tokens 3, 4 and 5 see token 3
    with torch.no_grad():
        mixed, _ = memory.key_mix(x, memory.key_mix.empty_tail(1, "cpu", x.dtype), None)
        mixed_changed, _ = memory.key_mix(changed, memory.key_mix.empty_tail(1, "cpu", x.dtype), None)
    moved = (mixed - mixed_changed).abs().amax(-1)[0] > 0
    assert moved.tolist() == [False, False, False, True, True, True, False, False, False]


@pytest.mark.parametrize("name", SPANNING)
@pytest.mark.parametrize("split", [8, 16])  # chunk boundaries: the tail carries the window across calls
def test_key_span_split_write_equals_one_write(name, split):
    assert_split_write_equals_one_write(spanning_memory(name), split)


@pytest.mark.parametrize("split", [1, 2, 11])
def test_key_span_linear_split_anywhere(split):
    assert_split_write_equals_one_write(spanning_memory("linear"), split)


def assert_masked_rows_equal_their_written_tokens_alone(memory) -> None:
    """A masked write of two rows gives, per row, the state of writing only that row's unmasked tokens
    (the linear memory: its result does not depend on where chunks fall)."""
    x = torch.randn(2, 21, DIM)
    mask = torch.rand(2, 21) > 0.4
    with torch.no_grad():
        masked = memory.write(x, memory.init_state(2), mask)
        for row in range(2):
            alone = memory.write(x[row : row + 1, mask[row]], memory.init_state(1))
            for key in alone.tensors:
                assert torch.allclose(masked[key][row], alone[key][0], rtol=1e-4, atol=1e-5), key


def test_key_span_skips_masked_positions():
    assert_masked_rows_equal_their_written_tokens_alone(spanning_memory("linear"))


@pytest.mark.parametrize("name", SPANNING)
def test_key_span_weights_get_gradients(name):
    memory = spanning_memory(name)
    state = memory.write(torch.randn(2, 13, DIM), memory.init_state(2))
    memory.read(torch.randn(2, 3, DIM), state).square().sum().backward()
    assert memory.key_mix.weight.grad is not None and memory.key_mix.weight.grad.abs().sum() > 0


# -- values over the tokens that follow (value_span) ------------------------------------------------------
def looking_ahead(name: str, offset: int, span: int = 3):
    """A memory whose values are exactly the input `offset` tokens ahead (queries projected like keys)."""
    memory = make_memory(name, DIM, value_span=span)
    with torch.no_grad():
        memory.value_mix.weight.zero_()
        memory.value_mix.weight[offset] = 1.0
        memory.to_queries.weight.copy_(memory.to_keys.weight)
    return memory


@pytest.mark.parametrize("name", SPANNING)
def test_value_span_starts_as_the_mean_of_the_window(name):
    """At init the values are those of a single-token memory written with each input replaced by the
    mean of it and the next value_span − 1 inputs (zeros past the end)."""
    plain, spanning = make_memory(name, DIM), make_memory(name, DIM, value_span=4)
    spanning.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 13, DIM)
    padded = F.pad(x, (0, 0, 0, 3))
    window_mean = torch.stack([padded[:, t : t + 4].mean(1) for t in range(13)], dim=1)
    with torch.no_grad():
        assert torch.allclose(spanning.value_mix(x, None), window_mean, atol=1e-6)
        assert not torch.allclose(
            plain.write(x, plain.init_state(2))["w" if name == "linear" else "w1"],
            spanning.write(x, spanning.init_state(2))["w" if name == "linear" else "w1"],
        )


def test_values_see_later_tokens_of_the_call_only():
    memory = make_memory("linear", DIM, value_span=3)
    with torch.no_grad():
        memory.value_mix.weight.normal_()
        x = torch.randn(1, 9, DIM)
        changed = x.clone()
        changed[:, 5] += 1.0  # with span 3, the values of tokens 3, 4 and 5 see token 5
        moved = (memory.value_mix(x, None) - memory.value_mix(changed, None)).abs().amax(-1)[0] > 0
        assert moved.tolist() == [False, False, False, True, True, True, False, False, False]
        last = memory.value_mix(x[:, :6], None)[:, 5]  # past the call's end the window sees zeros
        assert torch.allclose(last, x[:, 5] * memory.value_mix.weight[0], atol=1e-6)


@pytest.mark.parametrize("name", SPANNING)
def test_a_key_recalls_the_value_of_a_later_token(name):
    """Reading at token t's input returns what was written two tokens later: the point of value_span."""
    memory = looking_ahead(name, offset=2)
    x = torch.randn(3, 6, DIM)
    with torch.no_grad():
        state = memory.write(x, memory.init_state(3))
        read = memory.read(x[:, :4], state)
        ahead, own = memory.recall_target(x[:, 2:]), memory.recall_target(x[:, :4])
        empty = memory.read(x[:, :4], memory.init_state(3))
    to_ahead, empty_to_ahead, to_own = (
        ((got - want).square().sum() / want.square().sum()).item() for got, want in ((read, ahead), (empty, ahead), (read, own))
    )
    assert to_ahead < 0.75 * empty_to_ahead, (to_ahead, empty_to_ahead)
    assert to_ahead < 0.75 * to_own, (to_ahead, to_own)


def test_value_span_skips_masked_positions():
    assert_masked_rows_equal_their_written_tokens_alone(looking_ahead("linear", offset=1))


@pytest.mark.parametrize("name", SPANNING)
def test_value_span_weights_get_gradients(name):
    memory = make_memory(name, DIM, value_span=3)
    state = memory.write(torch.randn(2, 13, DIM), memory.init_state(2))
    memory.read(torch.randn(2, 3, DIM), state).square().sum().backward()
    grad = memory.value_mix.weight.grad
    assert grad is not None and grad[1:].abs().sum() > 0  # the look-ahead rows learn, not only the current token's row


# -- values of the next token (value_offset) ----------------------------------------------------------------
def test_value_offset_stores_the_next_token_under_a_tokens_key():
    """With queries projected like keys, reading at token t's input returns what token t + 1 would store."""
    memory = make_memory("linear", DIM, value_offset=1)
    with torch.no_grad():
        memory.to_queries.weight.copy_(memory.to_keys.weight)
        memory.to_beta.bias.fill_(10.0)  # write every token fully
        x = torch.randn(3, 6, DIM)
        read = memory.read(x[:, :5], memory.write(x, memory.init_state(3)))
        nxt, own = memory.recall_target(x[:, 1:]), memory.recall_target(x[:, :5])
    to_next, to_own = (((read - want).square().sum() / want.square().sum()).item() for want in (nxt, own))
    assert to_next < 0.5 * to_own, (to_next, to_own)


def test_value_offset_leaves_the_last_tokens_unwritten():
    """A write call's last token has no next token: it stores nothing, so a one-token write leaves the memory empty."""
    memory = make_memory("linear", DIM, value_offset=1)
    with torch.no_grad():
        state = memory.write(torch.randn(2, 1, DIM), memory.init_state(2))
        assert state["w"].abs().max() == 0
        two = memory.write(torch.randn(2, 2, DIM), memory.init_state(2))
        assert two["w"].abs().max() > 0


def test_value_offset_skips_masked_positions():
    memory = make_memory("linear", DIM, value_offset=1)
    with torch.no_grad():
        x = torch.randn(1, 7, DIM)
        mask = torch.tensor([[True, False, True, True, False, True, False]])
        masked = memory.write(x, memory.init_state(1), mask)
        alone = memory.write(x[:, mask[0]], memory.init_state(1))
    torch.testing.assert_close(masked["w"], alone["w"], atol=1e-5, rtol=0)


# -- the episodic memory's slots -----------------------------------------------------------------------------
def test_episodic_keeps_the_strongest_tokens_and_the_later_of_equals():
    memory = make_memory("episodic", DIM, slots=4)
    with torch.no_grad():
        memory.to_beta.weight.zero_()
        memory.to_beta.weight[0, 0] = 1.0  # strength rises with channel 0 of the input
        x = torch.randn(1, 10, DIM)
        x[0, :, 0] = torch.tensor([0.0, 5.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0])
        state = memory.write(x[:, :6], memory.init_state(1))
        state = memory.write(x[:, 6:], state)
    assert sorted(state["order"][0].tolist()) == [1.0, 4.0, 8.0, 9.0]  # the two strong ones, then the latest


def test_episodic_reads_nothing_from_an_empty_memory_and_one_value_exactly():
    memory = make_memory("episodic", DIM)
    with torch.no_grad():
        memory.to_queries.weight.copy_(memory.to_keys.weight)
        memory.log_temperature.fill_(6.0)  # a sharp read
        x = torch.randn(1, 5, DIM)
        assert memory.read(x, memory.init_state(1)).abs().max() == 0
        read = memory.read(x, memory.write(x, memory.init_state(1)))
    torch.testing.assert_close(read, memory.recall_target(x), atol=1e-3, rtol=1e-3)


def test_episodic_gives_its_slots_in_write_order():
    """Two writes: the kept slots in write order hold the values written in that order (with value_offset 1 the
    input after each token; a write's last token stores nothing), empty slots first."""
    memory = make_memory("episodic", DIM, values="input", value_offset=1, slots=10)
    with torch.no_grad():
        x = torch.randn(1, 9, DIM)
        state = memory.write(x[:, 4:], memory.write(x[:, :4], memory.init_state(1)))
        order, values = memory.in_write_order(state)
    expected = x[0, [1, 2, 3, 5, 6, 7, 8]]
    torch.testing.assert_close(values[0, 3:], expected)
    assert values[0, :3].abs().max() == 0 and (state["order"][0, order[0, :3]] == -1).all()


def test_episodic_recency_lets_the_later_of_two_equal_keys_win():
    memory = make_memory("episodic", DIM, values="input", value_offset=1, slots=16)
    with torch.no_grad():
        memory.to_queries.weight.copy_(memory.to_keys.weight)
        memory.log_temperature.fill_(6.0)
        key, old, new = torch.randn(3, DIM)
        state = memory.write(torch.stack([key, old, torch.randn(DIM), key, new])[None], memory.init_state(1))
        even = memory.read(key[None, None], state)[0, 0]
        memory.recency.fill_(100.0)  # the older match was written 1.5 tokens before the mean of the two: 2.3 logits less
        later = memory.read(key[None, None], state)[0, 0]
    torch.testing.assert_close(even, (old + new) / 2, atol=1e-2, rtol=0)
    assert (later - new).norm() < 0.2 * (even - new).norm()


def test_episodic_recency_leaves_a_lone_match_its_weight_however_old():
    """Recency ranks matches against each other: one match written long before everything else reads the same
    with λ on as with λ off."""
    memory = make_memory("episodic", DIM, values="input", value_offset=1, slots=600)
    with torch.no_grad():
        memory.to_queries.weight.copy_(memory.to_keys.weight)
        memory.log_temperature.fill_(4.0)
        key, value = torch.randn(2, DIM)
        later = torch.randn(500, DIM)
        state = memory.write(torch.cat([torch.stack([key, value]), later])[None], memory.init_state(1))
        off = memory.read(key[None, None], state)[0, 0]
        memory.recency.fill_(50.0)  # 500 tokens older than the newest slot: 390 logits less if age counted from the newest
        on = memory.read(key[None, None], state)[0, 0]
    torch.testing.assert_close(on, off, atol=1e-3, rtol=0)
    assert torch.nn.functional.cosine_similarity(on, value, dim=0) > 0.9


# -- the surprise bound (titans max_surprise) -----------------------------------------------------------------
def grown_titans(max_surprise):
    """A Titans memory whose MLP weights have grown to 3× their init and whose θ may reach 4: with the
    key-only step cap on (the default), its inner loop diverges on an ordinary write."""
    memory = make_memory("titans", DIM, max_lr=4.0, max_surprise=max_surprise)
    with torch.no_grad():
        for weight in memory.mlp.weights:
            weight.mul_(3.0)
    return memory


def test_max_surprise_keeps_a_diverging_inner_loop_finite():
    x = torch.randn(2, 160, DIM)
    with torch.no_grad():
        unbounded, bounded = (m.write(x, m.init_state(2)) for m in (grown_titans(None), grown_titans(10.0)))
    assert not all(torch.isfinite(unbounded[f"w{l}"]).all() for l in range(2))  # the failure it guards against
    for name, tensor in bounded.tensors.items():
        assert torch.isfinite(tensor.float()).all(), name


def test_max_surprise_leaves_ordinary_writes_unchanged():
    bounded, unbounded = make_memory("titans", DIM), make_memory("titans", DIM, max_surprise=None)
    assert bounded.config.max_surprise == 10.0  # the default
    x = torch.randn(3, 40, DIM)
    with torch.no_grad():
        assert_states_equal(bounded.write(x, bounded.init_state(3)), unbounded.write(x, unbounded.init_state(3)), rtol=0, atol=0)


def test_max_surprise_backward_is_finite_through_empty_chunks():
    """An empty chunk's update is exactly 0; the bound must not put a 0·∞ into the outer gradient."""
    memory = make_memory("titans", DIM)
    x = torch.randn(2, 24, DIM)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, 8:] = False  # row 0: chunks 2 and 3 hold nothing
    state = memory.write(x, memory.init_state(2), mask)
    memory.read(torch.randn(2, 3, DIM), state).square().sum().backward()
    for name, p in memory.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# -- linear: write floor ---------------------------------------------------------------------------
def floored_and_plain(floor: float) -> tuple[LinearMemory, LinearMemory]:
    # keys and strengths from each token alone, so that a floored token is exactly a masked one
    floored = make_memory("linear", DIM, heads=1, decay=False, key_span=1, gate_span=1, write_floor=floor)
    with torch.no_grad():
        floored.to_beta.weight.normal_(0.0, 1.0)  # strengths spread over (0, 1)
        floored.to_beta.bias.zero_()
    plain = make_memory("linear", DIM, heads=1, decay=False, key_span=1, gate_span=1, write_floor=0.0)
    plain.load_state_dict(floored.state_dict())
    return floored, plain


def test_write_floor_drops_exactly_the_faint_writes_at_inference():
    """In eval mode a token whose strength is under the floor leaves the memory as if it were masked
    (no decay); the others write at their own strength."""
    floored, plain = floored_and_plain(0.5)
    floored.eval()
    x = torch.randn(2, 37, DIM)
    with torch.no_grad():
        beta = plain.write_strengths(x)[..., 0]
        strong = beta >= 0.5
        assert strong.any() and (~strong).any()
        got, masked = floored.write(x, floored.init_state(2)), plain.write(x, plain.init_state(2), strong)
        torch.testing.assert_close(got["w"], masked["w"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(floored.write_strengths(x)[..., 0], beta * strong)


def test_write_floor_is_off_in_training():
    floored, plain = floored_and_plain(0.5)
    x = torch.randn(2, 37, DIM)
    with torch.no_grad():
        torch.testing.assert_close(floored.write(x, floored.init_state(2))["w"], plain.write(x, plain.init_state(2))["w"], rtol=0, atol=0)


def test_gate_span_leaves_every_other_initial_weight_and_the_rng_as_they_were():
    config = dict(dim=16, heads=2, dim_head=8, decay=True, key_span=2, value_span=2)
    torch.manual_seed(0)
    plain = LinearMemory(LinearMemory.Config(**config, gate_span=1))
    after_plain = torch.rand(4)
    torch.manual_seed(0)
    spanned = LinearMemory(LinearMemory.Config(**config, gate_span=4))
    after_spanned = torch.rand(4)
    assert torch.equal(after_plain, after_spanned)  # what is built next (an injector) starts the same too
    others = {k: v for k, v in spanned.state_dict().items() if not k.startswith("beta_ahead")}
    assert others.keys() == plain.state_dict().keys()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, others[name]), name
    assert not spanned.beta_ahead.weight.any()


def test_gate_span_starts_as_the_plain_gate_and_looks_ahead_only_within_its_span():
    torch.manual_seed(0)
    spanned = LinearMemory(LinearMemory.Config(dim=16, heads=2, dim_head=8, gate_span=3))
    plain = LinearMemory(LinearMemory.Config(dim=16, heads=2, dim_head=8, gate_span=1))
    plain.load_state_dict({k: v for k, v in spanned.state_dict().items() if not k.startswith("beta_ahead")})
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        assert torch.equal(spanned.write_strengths(x), plain.write_strengths(x))  # look-ahead weights start at 0
        torch.testing.assert_close(spanned.write(x, spanned.init_state(2))["w"], plain.write(x, plain.init_state(2))["w"])
        spanned.beta_ahead.weight.normal_()
        changed = x.clone()
        changed[:, 5] += 1.0
        moved = (spanned.write_strengths(changed) - spanned.write_strengths(x)).abs().sum((0, 2))
    assert (moved[3:6] > 0).all()  # token 5 itself and the two before it, which see it ahead
    assert (moved[:3] == 0).all() and moved[6] == 0  # out of their span, or behind them
