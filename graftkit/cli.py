"""The `graftkit` command line. Each command is a thin call into a library function."""

from __future__ import annotations

import argparse
import sys

from graftkit.errors import GraftkitError


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # loads plugins: a plugin conflict is a message, not a traceback
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return args.func(args) or 0
    except GraftkitError as exc:
        print(f"graftkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("graftkit: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    from graftkit.plugins import get_plugins

    parser = argparse.ArgumentParser(prog="graftkit", description="Graft a trainable memory onto a frozen LLM.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("validate", help="check a recipe without loading weights")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plugins", help="list plugins and the components they register")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("train", help="train a graft from a recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run on BABILong (two-turn) with baselines")
    p.add_argument("run_dir")
    p.add_argument("--tasks", help="comma-separated, e.g. qa1,qa2 (default: the recipe's)")
    p.add_argument("--lengths", help="comma-separated, e.g. 1k,4k (default: the recipe's eval_lengths)")
    p.add_argument("--n", type=int, default=200, help="test samples per task and length (default 200)")
    p.add_argument("--checkpoint", default="best", help="best, last, or a step number")
    p.add_argument("--rows", help="comma-separated subset of: graft,empty,full_context,question_only,chance")
    p.add_argument("--corrected", action="store_true", help="use the corrected answer check (qa7 none/one)")
    p.set_defaults(func=cmd_eval)

    get_plugins().pm.hook.register_commands(cli=sub)
    return parser


def cmd_validate(args) -> int:
    from graftkit.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(
        f"{args.recipe}: ok (backbone {recipe.backbone.kind}, memory {recipe.memory.kind}, "
        f"injector {recipe.injector.kind})"
    )
    return 0


def cmd_plugins(args) -> int:
    from graftkit.plugins import get_plugins

    plugins = get_plugins()
    print("plugins:")
    for info in plugins.info.values():
        print(f"  {info.name:32} {info.distribution} {info.version}")
    for kind, registry in plugins.registries.items():
        print(f"{kind}:")
        for name, cls in sorted(registry.classes.items()):
            owner = plugins.owner_of(kind, name)
            doc = (cls.__doc__ or "").strip().splitlines()
            print(f"  {name:24} [{owner.distribution}] {doc[0] if doc else ''}")
    return 0


def cmd_train(args) -> int:
    from graftkit.recipe import load_recipe
    from graftkit.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    result = train(recipe, resume=args.resume)
    print(f"run written to {result.run_dir} (best eval accuracy {result.best_accuracy:.1%} at step {result.best_step})")
    return 0


def cmd_eval(args) -> int:
    from graftkit.evaluate import evaluate_run

    evaluate_run(
        args.run_dir,
        tasks=_split(args.tasks),
        lengths=_split(args.lengths),
        n=args.n,
        checkpoint=args.checkpoint,
        rows=_split(args.rows),
        corrected=args.corrected,
    )
    return 0


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


if __name__ == "__main__":
    sys.exit(main())
