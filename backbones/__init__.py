"""Built-in backbone families: one Hugging Face causal-LM adapter under three names."""

from graftkit.hookspecs import hookimpl


@hookimpl
def register_backbones(register):
    from graftkit.backbones.hf import LlamaBackbone, MistralBackbone, Qwen2Backbone

    for cls in (Qwen2Backbone, LlamaBackbone, MistralBackbone):
        register(cls)
