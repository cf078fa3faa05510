"""The `graftkit` command line. Each command is a thin call into a library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graftkit.errors import GraftkitError
from graftkit.evaluate import evaluate_run
from graftkit.export import export_run, load_graft
from graftkit.plugins import BUILTINS, get_plugins
from graftkit.recipe import load_recipe
from graftkit.sessions import ask, chat_turn, is_utf8, load_state, memorize, reset, save_state
from graftkit.train import train


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
    except OSError as exc:  # a path the user named cannot be written or read (a parent that is a file, no permission, a full disk)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"graftkit: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except UnicodeError:  # an argument or a file that is not UTF-8 text
        print("graftkit: error: an argument or an input is not valid UTF-8 text", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graftkit: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graftkit", description="Graft a trainable memory onto a frozen LLM.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("validate", help="check a recipe without loading weights")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="optional changes to the recipe, e.g. train.steps=100")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plugins", help="list plugins and the components they register")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("reference", help="print the recipe reference (every key, its default and description) as Markdown")
    p.add_argument("--out", help="write the reference to this file instead of standard output")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("train", help="train a graft from a recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="optional changes to the recipe, e.g. train.steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run (two-turn) on its tasks, with baselines and preservation")
    p.add_argument("run_dir")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe settings changed for this evaluation only, e.g. data.eval_lengths=[1k,16k] or "
        "memory.write_floor=0.7 (the run's recipe.yaml is left as it is; results.json records them)",
    )
    p.add_argument("--lengths", help="comma-separated, e.g. 1k,4k: sets eval_lengths of every task that has lengths")
    p.add_argument("--n", type=int, default=200, help="test examples per bucket and general prompts (default 200)")
    p.add_argument("--checkpoint", default="best", help="best, last, or a step number")
    p.add_argument("--rows", help="comma-separated subset of: graft,empty,full_context,question_only,chance,preservation")
    p.add_argument("--out", help="directory for results.{json,md}, chart.png, predictions.jsonl (default RUN_DIR/eval)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a trained graft (config, tensors, model card) to a directory")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default="best", help="best, last, or a step number")
    p.add_argument("--out", required=True, help="export directory (new, empty, or a previous export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("memorize", help="write text into a memory state file (created if missing)")
    p.add_argument("export_dir", help="an exported graft (graftkit export)")
    p.add_argument("--state", required=True, help="memory state file (.safetensors)")
    p.add_argument("files", nargs="*", help="text files to memorize, in order (default: standard input)")
    p.set_defaults(func=cmd_memorize)
    p.__class__ = _IntermixedParser  # FILES may follow --state

    p = sub.add_parser("ask", help="answer a question from a memory state alone")
    p.add_argument("export_dir", help="an exported graft (graftkit export)")
    p.add_argument("--state", required=True, help="memory state file written by `graftkit memorize` or `chat`")
    p.add_argument("question", nargs="+")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--task", help="put the question into this trained task prompt (see the export's README); default: the question as it is")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", help="interactive: statements are memorized, questions (ending in ?) answered")
    p.add_argument("export_dir", help="an exported graft (graftkit export)")
    p.add_argument("--state", required=True, help="memory state file (created if missing, saved on exit)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--task", help="put questions into this trained task prompt; default: the questions as they are")
    p.set_defaults(func=cmd_chat)

    add_plugin_commands(sub)
    return parser


def add_plugin_commands(sub) -> None:
    """Each plugin's `register_commands`, one at a time: a plugin that fails is skipped with a warning (and
    whatever it half-added removed), so the other commands still work."""
    plugins = get_plugins()
    for impl in plugins.pm.hook.register_commands.get_hookimpls():
        before = dict(sub.choices)
        try:
            impl.function(cli=sub)
        except Exception as exc:
            if impl.plugin_name in BUILTINS:
                raise
            for name in set(sub.choices) - set(before):
                del sub.choices[name]
            sub._choices_actions[:] = [a for a in sub._choices_actions if a.dest in before]
            plugins.warn_failed(impl.plugin_name, "register_commands", exc)


def cmd_validate(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    tasks = ", ".join(c.task for c in recipe.task_configs())
    print(f"{args.recipe}: ok (backbone {recipe.backbone.kind}, memory {recipe.memory.kind}, injector {recipe.injector.kind}, tasks {tasks})")
    return 0


def cmd_plugins(args) -> int:
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


def cmd_reference(args) -> int:
    from graftkit.reference import render

    text = render()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"recipe reference written to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_train(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    result = train(recipe, resume=args.resume)
    print(f"run written to {result.run_dir} (best eval accuracy {result.best_accuracy:.1%} at step {result.best_step})")
    return 0


def cmd_eval(args) -> int:
    overrides = list(args.overrides)
    lengths = _split(args.lengths)
    if lengths is not None:
        overrides += lengths_overrides(args.run_dir, lengths, overrides)
    evaluate_run(args.run_dir, n=args.n, checkpoint=args.checkpoint, rows=_split(args.rows), out=args.out, overrides=overrides)
    return 0


def cmd_export(args) -> int:
    out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint)
    print(f"exported {args.run_dir} ({args.checkpoint} checkpoint) to {out}")
    return 0


def cmd_memorize(args) -> int:
    if not args.files and sys.stdin.isatty():
        print("reading the text to memorize from standard input (end with Ctrl-D)", file=sys.stderr)
    texts = [(f, _read_text(f)) for f in args.files] if args.files else [("standard input", sys.stdin.read())]
    for name, text in texts:
        if not text.strip():
            raise GraftkitError(f"{name}: nothing to memorize (no text)")
    graft = load_graft(args.export_dir)
    state = load_state(graft, args.state, missing_ok=True)
    for _, text in texts:
        state = memorize(graft, text, state)
    save_state(graft, state, args.state)
    print(f"{args.state}: holds {int(state.tokens_written[0])} tokens")
    return 0


def cmd_ask(args) -> int:
    if not Path(args.state).is_file():
        raise GraftkitError(
            f"--state {args.state}: no such memory state file; write one first with `graftkit memorize {args.export_dir} --state {args.state} FILE`"
        )
    graft = load_graft(args.export_dir)
    state = load_state(graft, args.state)
    print(ask(graft, " ".join(args.question), state, task=args.task, max_new_tokens=args.max_new_tokens))
    return 0


def cmd_chat(args) -> int:
    if args.max_new_tokens <= 0:
        raise GraftkitError(f"--max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    graft = load_graft(args.export_dir)
    state = load_state(graft, args.state, missing_ok=True)
    tty = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes become a message for their line, not a crash
        sys.stdin.reconfigure(errors="surrogateescape")
    if tty:
        print(
            f"memory {args.state}: {int(state.tokens_written[0])} tokens. Statements are memorized, lines ending "
            "in '?' answered. /save, /reset, /quit"
        )
    number = 0
    try:
        while True:
            line = input("> " if tty else "").strip()
            number += 1
            if not is_utf8(line):
                print(f"graftkit: error: line {number}: not valid UTF-8 text; skipped", file=sys.stderr)
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/save":
                save_state(graft, state, args.state)
                print(f"saved {args.state}")
            elif line == "/reset":
                state = reset(graft)
                print("memory cleared")
            elif line.startswith("/"):
                print("commands: /save, /reset, /quit")
            else:
                try:  # a bad line is a message; the session (and its memory) goes on
                    state, reply = chat_turn(graft, state, line, args.task, args.max_new_tokens)
                except GraftkitError as exc:
                    print(f"graftkit: error: line {number}: {exc}", file=sys.stderr)
                    continue
                except (RuntimeError, ValueError, MemoryError) as exc:
                    print(
                        f"graftkit: error: line {number}: could not be processed ({type(exc).__name__}: {exc}); the memory is as it was before it",
                        file=sys.stderr,
                    )
                    continue
                if reply is not None:
                    print(reply)
    except (EOFError, KeyboardInterrupt):
        pass
    save_state(graft, state, args.state)
    if tty:
        print(f"\nsaved {args.state} ({int(state.tokens_written[0])} tokens)")
    return 0


def lengths_overrides(run_dir: str, lengths: list[str], overrides: list[str]) -> list[str]:
    """`data.N.eval_lengths=[...]` for every task block (of a run's recipe after `overrides`) that has eval lengths."""
    path = Path(run_dir) / "recipe.yaml"
    recipe = load_recipe(path, overrides, training=False) if path.is_file() else None
    if recipe is None:
        raise GraftkitError(f"{run_dir}: not a graftkit run directory (no recipe.yaml)")
    blocks = [i for i, c in enumerate(recipe.task_configs()) if "eval_lengths" in type(c).model_fields]
    if not blocks:
        raise GraftkitError("--lengths: none of this run's tasks has lengths; leave it out")
    return [f"data.{i}.eval_lengths=[{','.join(lengths)}]" for i in blocks]


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GraftkitError(f"{path}: cannot read text ({exc.strerror if isinstance(exc, OSError) else 'not UTF-8'})") from None


class _IntermixedParser(argparse.ArgumentParser):
    """Positionals may come on both sides of options (`memorize DIR --state FILE a.txt b.txt`): a plain
    parser hands the optional FILES nothing at DIR and then rejects a.txt as unrecognized."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


if __name__ == "__main__":
    sys.exit(main())
