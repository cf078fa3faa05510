"""BABILong data for graftkit: bAbI parsing, the BABILong sample builder, prompts and the answer check.

Everything works from the vendored data in ``graftkit/data/vendor`` (bAbI v1.2 qa1-qa5, three Project
Gutenberg books; licenses in ``vendor/NOTICE.md``); every loader also takes your own paths.

    >>> from graftkit.data import build_babilong, question_prompt, compare_answers
    >>> samples = build_babilong("qa1", "test", "1k", n=100, seed=0, tokenizer=tokenizer)
    >>> turn1 = samples[0].context                                   # memorize
    >>> turn2 = question_prompt("qa1", samples[0].question)          # recall: no context
    >>> compare_answers(samples[0].target, model_output, samples[0].question, "qa1")

Imports only numpy and the standard library.
"""

from graftkit.data.babi import BabiQuestion, babi_file, load_babi, parse_babi
from graftkit.data.babilong import Sample, build_babilong, iter_babilong, sample_uid
from graftkit.data.books import VENDORED_BOOKS, Book, load_books, strip_gutenberg
from graftkit.data.metric import TASK_LABELS, accuracy, compare_answers
from graftkit.data.prompts import PROMPTS, TEMPLATE, PromptPieces, full_context_prompt, prompt_pieces, question_prompt
from graftkit.data.tasks import (
    LENGTHS,
    PROMPT_RESERVE,
    SPLITS,
    TASK_FILES,
    TASKS,
    DataError,
    TaskInfo,
    context_tokens,
    length_label,
    parse_length,
    vendor_dir,
)
from graftkit.data.tokens import TokenCounter, token_counter

__all__ = [
    "LENGTHS",
    "PROMPTS",
    "PROMPT_RESERVE",
    "SPLITS",
    "TASKS",
    "TASK_FILES",
    "TASK_LABELS",
    "TEMPLATE",
    "VENDORED_BOOKS",
    "BabiQuestion",
    "Book",
    "DataError",
    "PromptPieces",
    "Sample",
    "TaskInfo",
    "TokenCounter",
    "accuracy",
    "babi_file",
    "build_babilong",
    "compare_answers",
    "context_tokens",
    "full_context_prompt",
    "iter_babilong",
    "length_label",
    "load_babi",
    "load_books",
    "parse_babi",
    "parse_length",
    "prompt_pieces",
    "question_prompt",
    "sample_uid",
    "strip_gutenberg",
    "token_counter",
    "vendor_dir",
]
