"""Built-in memories, registered through the same hook as third-party plugins."""

from graftkit.hookspecs import hookimpl


@hookimpl
def register_memories(register):
    from graftkit.memories.attention_slots import AttentionSlotsMemory
    from graftkit.memories.episodic import EpisodicMemory
    from graftkit.memories.linear import LinearMemory
    from graftkit.memories.titans import TitansMemory

    for cls in (TitansMemory, LinearMemory, AttentionSlotsMemory, EpisodicMemory):
        register(cls)
