"""Built-in injectors, registered through the same hook as third-party plugins."""

from graftkit.hookspecs import hookimpl


@hookimpl
def register_injectors(register):
    from graftkit.injectors.copy import CopyInjector
    from graftkit.injectors.layer0 import Layer0SoftPrompt
    from graftkit.injectors.mid_layer import MidLayer
    from graftkit.injectors.multi_layer import MultiLayerCrossAttention

    for cls in (Layer0SoftPrompt, MidLayer, MultiLayerCrossAttention, CopyInjector):
        register(cls)
