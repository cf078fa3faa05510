"""Which hidden states know who moved: a linear probe for the subject of each qa1 fact, per layer.

In a fact such as "Mary travelled to the garden.", a memory that stores the location token's state can
only answer "Where is Mary?" if that state also says *Mary*. This runs the bare backbone over BABILong
qa1 contexts (facts inside book text), takes the hidden state of each fact's location token at several
layers (and of the full stop after it), and fits a multinomial logistic regression that predicts the
fact's subject (train split contexts), scored on test split contexts. A probe for the location on the
location token's states is the sanity check. Chance is about 1 / (number of people), 25% in qa1.

`--segment N` runs each context in independent segments of N tokens, as a graft's turn 1 does
(`memory.segment_tokens`; only the segments holding a fact are run); without it a context runs whole.
`--test-length L` scores the probes on test contexts of another length than they were fitted on (e.g.
fitted at 1k, scored at 16k: whether what tells people apart at 1k still does in a long context).

    python research/binding_probe.py [--length 1k] [--test-length L] [--train 150] [--test 100]
        [--layers 0,4,8,12,16,20,24,30] [--segment N] [--threads N]
"""

from __future__ import annotations

import argparse
from bisect import bisect_left

import torch
import torch.nn.functional as F


def fact_positions(tokenizer, sample) -> tuple[list[int], list[tuple[int, int, str, str]]]:
    """Token ids of the context and, per fact found in it, (position of the location's last token,
    position of the full stop, subject, location)."""
    encoded = tokenizer(sample.context, return_offsets_mapping=True, add_special_tokens=False)
    ends = [end for _, end in encoded["offset_mapping"]]
    found, cursor = [], 0
    for fact in sample.facts:
        at = sample.context.find(fact, cursor)
        if at < 0:
            continue
        cursor = at + len(fact)
        words = fact.rstrip(".").split()
        location_end = at + len(fact.rstrip("."))
        token, stop = bisect_left(ends, location_end), bisect_left(ends, cursor)  # first token ending there
        if stop < len(ends):
            found.append((token, stop, words[0], words[-1]))
    return encoded["input_ids"], found


@torch.no_grad()
def states_at(backbone, ids: list[int], positions: list[int], layers: list[int], segment: int) -> dict[int, torch.Tensor]:
    """Per layer, the hidden states (p d) at `positions` of `ids`, run whole (`segment` 0) or in
    independent segments of `segment` tokens (only those holding a position)."""
    spans = [(0, len(ids))] if segment <= 0 else [(s, s + segment) for s in range(0, len(ids), segment)]
    found = {layer: {} for layer in layers}
    for start, end in spans:
        inside = [p for p in positions if start <= p < end]
        if not inside:
            continue
        hidden = backbone.layer_states(torch.tensor([ids[start:end]]), layers)
        for layer in layers:
            for p in inside:
                found[layer][p] = hidden[layer][0, p - start].float().cpu()
    return {layer: torch.stack([found[layer][p] for p in positions]) for layer in layers}


@torch.no_grad()
def collect(backbone, samples, layers: list[int], segment: int = 0) -> tuple[dict, dict, list[str], list[str]]:
    """Per layer, the states (f d) of every fact's location token and full stop; subjects and locations (f)."""
    states, stops = {layer: [] for layer in layers}, {layer: [] for layer in layers}
    subjects, locations = [], []
    for sample in samples:
        ids, facts = fact_positions(backbone.tokenizer, sample)
        if not facts:
            continue
        where, stop = [f[0] for f in facts], [f[1] for f in facts]
        found = states_at(backbone, ids, where + stop, layers, segment)
        for layer in layers:
            states[layer].append(found[layer][: len(where)])
            stops[layer].append(found[layer][len(where) :])
        subjects += [f[2] for f in facts]
        locations += [f[3] for f in facts]
    joined = lambda rows: {layer: torch.cat(r) for layer, r in rows.items()}  # noqa: E731
    return joined(states), joined(stops), subjects, locations


def probe(train_x: torch.Tensor, train_y: list[str], test_x: torch.Tensor, test_y: list[str]) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression on standardised features."""
    classes = sorted(set(train_y))
    index = {c: i for i, c in enumerate(classes)}
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    x, tx = (train_x - mean) / std, (test_x - mean) / std
    y = torch.tensor([index[c] for c in train_y])
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 1e-2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    predicted = (tx @ weight + bias).argmax(-1)
    gold = torch.tensor([index.get(c, -1) for c in test_y])
    return (predicted == gold).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", default="1k")
    parser.add_argument("--test-length", default=None, help="length of the test contexts (default: --length)")
    parser.add_argument("--train", type=int, default=150, help="train split contexts")
    parser.add_argument("--test", type=int, default=100, help="test split contexts")
    parser.add_argument("--layers", default="0,4,8,12,16,20,24,30")
    parser.add_argument("--segment", type=int, default=0, help="tokens per independent segment (0: whole context)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import graftkit
    from graftkit.data.babilong import build_babilong

    backbone = graftkit.load_backbone({"kind": "llama"})
    layers = [int(v) for v in args.layers.split(",")]
    tok = backbone.tokenizer
    test_length = args.test_length or args.length
    train = collect(backbone, build_babilong("qa1", "train", args.length, args.train, seed=0, tokenizer=tok), layers, args.segment)
    test = collect(backbone, build_babilong("qa1", "test", test_length, args.test, seed=0, tokenizer=tok), layers, args.segment)
    people = len(set(train[2]))
    run_as = f"segments of {args.segment} tokens" if args.segment > 0 else "whole contexts"
    print(
        f"qa1, fitted at {args.length}, scored at {test_length} ({run_as}): {len(train[2])} train facts, "
        f"{len(test[2])} test facts, {people} people (chance {1 / people:.0%}); test accuracy of linear probes"
    )
    print("| hidden state | subject from the location token | subject from the full stop | location from the location token |")
    print("|---:|---:|---:|---:|")
    for layer in layers:
        who = probe(train[0][layer], train[2], test[0][layer], test[2])
        who_stop = probe(train[1][layer], train[2], test[1][layer], test[2])
        where = probe(train[0][layer], train[3], test[0][layer], test[3])
        print(f"| {layer} | {who:.1%} | {who_stop:.1%} | {where:.1%} |")


if __name__ == "__main__":
    main()
