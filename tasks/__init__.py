"""Built-in tasks, registered through the same hook as third-party plugins."""

from graftkit.hookspecs import hookimpl


@hookimpl
def register_tasks(register):
    from graftkit.tasks.babilong import BabilongTask
    from graftkit.tasks.jsonl import JsonlTask
    from graftkit.tasks.profile import ProfileTask

    for cls in (BabilongTask, JsonlTask, ProfileTask):
        register(cls)
