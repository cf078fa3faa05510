"""Standardisation of written hidden states: calibration, what the memory sees, and persistence."""

from __future__ import annotations

import pytest
import torch
from matrix import make_memory

import graftkit
from graftkit.graft import Graft
from graftkit.write_norm import CALIBRATION_TOKENS, WriteNorm, calibration_text


@pytest.fixture
def make_graft(tiny_backbone):
    """make_graft(family="llama", calibrate=True, injector=("layer0_soft_prompt", {}), **memory_options)
    -> a graft writing hidden state 1; detached after the test."""
    built = []

    def make(family: str = "llama", calibrate: bool = True, injector=("layer0_soft_prompt", {}), **memory_options) -> Graft:
        backbone = tiny_backbone(family)
        torch.manual_seed(0)
        memory = make_memory("linear", backbone.hidden_size, write_layer=1, **memory_options)
        kind, options = injector
        injector = graftkit.create("injector", kind, hidden_size=backbone.hidden_size, num_layers=backbone.num_layers, num_tokens=4, **options)
        built.append(Graft(backbone, memory, injector, calibrate=calibrate))
        return built[-1]

    yield make
    for graft in built:
        graft.injector.detach()


def test_write_norm_is_the_identity_until_calibrated_then_standardises():
    norm = WriteNorm(8)
    x = torch.randn(3, 5, 8)
    assert torch.equal(norm(x), x)
    data = torch.randn(400, 8) * torch.linspace(0.1, 50, 8) + torch.linspace(-100, 100, 8)
    norm.calibrate(data)
    out = norm(data)
    assert torch.allclose(out.mean(0), torch.zeros(8), atol=1e-3)
    assert torch.allclose(out.std(0), torch.ones(8), atol=1e-3)


def test_a_constant_channel_is_not_blown_up():
    data = torch.randn(100, 4)
    data[:, 2] = 7.0
    norm = WriteNorm(4)
    norm.calibrate(data)
    assert torch.isfinite(norm(data)).all()
    assert norm(data)[:, 2].abs().max() == 0


def test_graft_calibrates_on_the_bare_backbone_at_the_write_layer(make_graft):
    graft = make_graft()
    backbone = graft.backbone
    ids = backbone.text_ids(calibration_text())[:CALIBRATION_TOKENS]
    assert len(ids) == CALIBRATION_TOKENS
    hidden = backbone.hidden_states(torch.tensor([ids]), 1)[0].float()
    assert torch.allclose(graft.write_norm.mean, hidden.mean(0), atol=1e-5)
    assert torch.allclose(graft.write_norm.inv_std, 1 / hidden.std(0), rtol=1e-4)
    # the calibration passage comes out standardised
    standardised = graft.write_norm(hidden)
    assert torch.allclose(standardised.mean(0), torch.zeros(backbone.hidden_size), atol=1e-4)


def test_without_calibration_the_statistics_wait_for_loaded_tensors(make_graft):
    trained, loading = make_graft(), make_graft(calibrate=False)
    assert torch.equal(loading.write_norm.mean, torch.zeros_like(loading.write_norm.mean))
    loading.load_state_dict(trained.graft_state_dict())
    assert torch.equal(loading.write_norm.inv_std, trained.write_norm.inv_std)


def test_the_memory_is_written_with_standardised_states(make_graft):
    graft = make_graft()
    hidden = torch.randn(2, 9, graft.backbone.hidden_size) * 5 + 3
    written = graft.write_hidden(hidden)
    expected = graft.memory.write(graft.write_norm(hidden), graft.init_state(2))
    assert torch.equal(written["w"], expected["w"])
    assert not torch.allclose(written["w"], graft.memory.write(hidden, graft.init_state(2))["w"])


@pytest.mark.parametrize("standardize", [True, False])
def test_direct_reads_at_the_write_layer_query_like_written_states(make_graft, standardize):
    """mid_layer on decoder layer 0 sees hidden state 1, the written one: its direct-read queries are
    standardised like the writes (raw with standardize off), and the statistics stay graft tensors only."""
    graft = make_graft(injector=("mid_layer", {"layer": 0, "direct_read": True}), standardize=standardize)
    ids = torch.tensor([[5, 9, 2, 7, 3]])
    state = graft.memorize(input_ids=torch.tensor([[4, 8, 1, 6]]))
    queries = []
    read = graft.memory.read
    graft.memory.read = lambda q, s: queries.append(q) or read(q, s)
    graft(ids, state)
    hidden = graft.backbone.hidden_states(ids, 1).float()
    seen = graft.write_norm(hidden) if standardize else hidden
    direct = [q for q in queries if q.shape[1] == ids.shape[1]]
    assert len(direct) == 1
    assert torch.allclose(direct[0], graft.injector.to_query(seen), atol=1e-5)
    assert not any(name.startswith("injector.query_norm") for name in graft.state_dict())


def test_standardize_off_writes_the_raw_states(make_graft):
    graft = make_graft(standardize=False)
    assert graft.write_norm is None
    assert not any(name.startswith("write_norm") for name in graft.state_dict())
    hidden = torch.randn(2, 9, graft.backbone.hidden_size)
    assert torch.equal(graft.write_hidden(hidden)["w"], graft.memory.write(hidden, graft.init_state(2))["w"])


def test_statistics_are_graft_tensors_that_checkpoints_restore(make_graft):
    graft = make_graft()
    names = {name for name in graft.graft_state_dict() if name.startswith("write_norm")}
    assert names == {"write_norm.mean", "write_norm.inv_std"}
    assert not any(p is graft.write_norm.mean for p in graft.trainable_parameters())
    saved = graft.graft_state_dict()
    graft.write_norm.mean.zero_()
    graft.load_state_dict(saved)
    assert torch.equal(graft.write_norm.mean, saved["write_norm.mean"])


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_every_family_calibrates(make_graft, family):
    graft = make_graft(family)
    assert torch.isfinite(graft.write_norm.inv_std).all()
    assert graft.write_norm.mean.abs().sum() > 0
