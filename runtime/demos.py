"""Demonstrations as a layer parameter: drawing, bootstrapping, swapping, rendering.

A layer whose spec has `demos:` shows k labelled examples in its template
(`{{ demos }}`). They come from the train split only (never dev or test, which
score the network), are class-balanced (round-robin over the labels, so a
small model's label prior is not reinforced by the demonstrations) and drawn
from a seeded generator, so the same seed gives the same demonstrations. The
trainer searches them with the instruction (runtime/optimizer.py): a balanced
redraw, a bootstrapped set (examples the model already gets right, as DSPy's
BootstrapFewShot keeps traces that pass), and a one-demonstration swap.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from dlngraph.compiler.plan import ExecutionPlan
from dlngraph.runtime.backward import stable_seed
from dlngraph.runtime.data import Example, read_jsonl
from dlngraph.runtime.layers.base import Demo
from dlngraph.runtime.template import render
from dlngraph.spec import LayerNode

LABEL = "label"


def as_demo(example: Example, inputs: Iterable[str], target: str) -> Demo:
    """One train example as a demonstration: its inputs and its target as `label`."""
    return tuple(sorted([*((f, example[f]) for f in inputs), (LABEL, example[target])]))


def from_dicts(shown: Iterable[Mapping[str, str]]) -> tuple[Demo, ...]:
    """Demonstrations as a spec's `examples` or a checkpoint write them ({field: value})."""
    return tuple(tuple(sorted(d.items())) for d in shown)


def label_of(demo: Demo) -> str:
    return dict(demo)[LABEL]


def balanced(pool: Sequence[Demo], k: int, rng: random.Random, first: Sequence[Demo] = ()) -> tuple[Demo, ...]:
    """k demonstrations, round-robin over the labels (sorted), each label's
    examples in a random order; `first` (e.g. bootstrapped ones) are taken
    before the pool's within their label. Fewer than k only if the pool is small."""
    by_label: dict[str, list[Demo]] = {}
    preferred = {d for d in first}
    for demo in sorted(set(pool) | preferred):
        by_label.setdefault(label_of(demo), []).append(demo)
    for demos in by_label.values():
        rng.shuffle(demos)
        demos.sort(key=lambda d: d not in preferred)  # stable: preferred first, random otherwise
    chosen: list[Demo] = []
    labels = sorted(by_label)
    rng.shuffle(labels)  # which label leads (and so comes last before the query) is part of the draw
    while len(chosen) < k and any(by_label.values()):
        for label in labels:
            if by_label[label] and len(chosen) < k:
                chosen.append(by_label[label].pop(0))
    rng.shuffle(chosen)
    return tuple(chosen)


def swap(demos: Sequence[Demo], pool: Sequence[Demo], rng: random.Random) -> tuple[Demo, ...]:
    """`demos` with one replaced by an unused pool example of the same label (balance kept)."""
    if not demos:
        return tuple(demos)
    at = rng.randrange(len(demos))
    label = label_of(demos[at])
    unused = sorted(d for d in set(pool) - set(demos) if label_of(d) == label)
    if not unused:
        return tuple(demos)
    out = list(demos)
    out[at] = rng.choice(unused)
    return tuple(out)


def text_of(spec: LayerNode, demos: tuple[Demo, ...], *, node: str | None = None) -> str:
    """The text `{{ demos }}` stands for in node `spec`'s template ("" without demos)."""
    if spec.demos is None or not demos:
        return ""
    return _rendered(spec.demos.template, spec.demos.separator, demos, node)


@lru_cache(maxsize=1024)
def _rendered(template: str, separator: str, demos: tuple[Demo, ...], node: str | None) -> str:
    # Every candidate is scored on a whole batch: render its demonstrations once.
    return separator.join(render(template, "", dict(d), node=node).strip("\n") for d in demos)


def pool(plan: ExecutionPlan, name: str) -> list[Demo]:
    """Every train example as a demonstration for node `name` (empty without a train split)."""
    path = plan.data_paths.get("train")
    target = plan.nodes[name].target
    if path is None or target is None:
        return []
    return list(_pool(Path(path), tuple(plan.nodes[name].inputs), target, path.stat().st_mtime_ns))


@lru_cache(maxsize=16)
def _pool(path: Path, inputs: tuple[str, ...], target: str, _mtime: int) -> tuple[Demo, ...]:
    return tuple(as_demo(ex, inputs, target) for ex in read_jsonl(path, [*inputs, target]))


def initial(plan: ExecutionPlan, name: str, seed: int) -> tuple[Demo, ...]:
    """The node's demonstrations before any fit: the spec's fixed `examples`, else a
    balanced draw of `count` from train seeded by (seed, node)."""
    node = plan.nodes[name].spec
    spec = node.demos if isinstance(node, LayerNode) else None
    if spec is None:
        return ()
    if spec.examples is not None:
        return from_dicts(spec.examples)
    return balanced(pool(plan, name), spec.count, random.Random(stable_seed(seed, name, "demos")))
