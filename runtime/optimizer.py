"""Optimizers: how a backward stage's trainable layers choose their next parameters.

A strategy object, as DSPy's `Teleprompter.compile` or TextGrad's
`Optimizer.step`: the trainer runs the forward and the posterior (the targets of
hidden nodes), then hands each backward stage to `Optimizer.step`, which returns
one `Selection` of new `Params` per trainable layer of the stage. The trainer's
loop knows nothing of how candidates are made or chosen, so another optimizer
plugs in by implementing `step`.

`DLNSearch` is the first: DLN-1's step (Sordoni et al. 2023) over the layer's
whole parameters, with the search signal a small model needs (issue 14):

- the pool: the current parameters, instruction proposals from the meta-prompt
  (written by the proposer backend; empty ones, duplicates and copies of the
  meta-prompt's scaffolding are dropped before scoring and counted), the best
  parameters seen on dev (`memory`), and for a layer with demonstrations a
  balanced redraw, a bootstrapped set (batch examples the model already gets
  right, as DSPy's BootstrapFewShot) and a one-demonstration swap, in turn;
- the score: every candidate on the (class-balanced) batch, mean log-likelihood
  of the targets, calibrated under the candidate's own label prior; an example
  a candidate shows as a demonstration is left out of its mean;
- the choice: argmax, ties keeping the current parameters.

The optimizer makes the stage's `prompt_proposals` and `candidate_scoring`
calls as the plan lists them (`Trainer.run_calls`): all proposals of a stage
one generate call, all candidates x examples one score call, per backend.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from dlngraph.compiler.plan import Stage
from dlngraph.runtime import demos, metrics
from dlngraph.runtime.backward import (
    Selection,
    filter_proposals,
    proposal_requests,
    rng_for,
    select_candidate,
    stable_seed,
)
from dlngraph.runtime.layers.base import Demo, Params
from dlngraph.spec import LayerNode

if TYPE_CHECKING:
    from dlngraph.runtime.trainer import Pass, Trainer

log = logging.getLogger(__name__)

DEMO_MOVES = ("redraw", "bootstrap", "swap")


class Optimizer(Protocol):
    """One backward stage's parameter update (see the module docstring)."""

    def step(
        self,
        trainer: "Trainer",
        stage: Stage,
        state: "Pass",
        params: Mapping[str, Params],
        iteration: int,
        memory: Sequence[Mapping[str, Params]],
    ) -> dict[str, Selection[Params]]: ...


@dataclass(frozen=True)
class DLNSearch:
    """DLN-1 over instruction and demonstrations, with memory (see the module docstring)."""

    def step(
        self,
        trainer: "Trainer",
        stage: Stage,
        state: "Pass",
        params: Mapping[str, Params],
        iteration: int,
        memory: Sequence[Mapping[str, Params]],
    ) -> dict[str, Selection[Params]]:
        names = [n for n in stage.nodes if trainer.plan.nodes[n].trainable]
        if not names:
            return {}
        train = trainer.train
        proposals = {
            n: proposal_requests(
                trainer.plan.nodes[n].proposer,
                params[n].prompt,
                trainer.attempts(n, state),
                train,
                rng_for(trainer.seed, iteration, f"meta-examples/{n}"),
                stable_seed(trainer.seed, iteration, n, "proposals"),
            )
            for n in names  # (with N = 1 nothing to ask, and the plan lists no call)
        }
        proposed = trainer.run_calls(stage, "prompt_proposals", proposals)
        candidates: dict[str, list[Params]] = {}
        dropped: dict[str, dict[str, int]] = {}
        for n in names:
            current = params[n].uncalibrated()
            remembered = [m[n].uncalibrated() for m in memory if n in m]
            kept, dropped[n] = filter_proposals(
                current.prompt, proposed.get(n, []), train.proposal_directives, [r.prompt for r in remembered]
            )
            pool = [current, *(Params(p, current.demos) for p in kept), *remembered]
            pool += self.demo_candidates(trainer, n, current, state, iteration)
            candidates[n] = list(dict.fromkeys(pool))  # the same parameters are scored once
        # per node: its targets under every candidate, and under a trust region a text
        # layer's current outputs too (how far each candidate moves them)
        deferred = {}
        for n in names:
            rows, targets = state.rows[n], state.targets[n]
            deferred[(n, "targets")] = trainer.layers[n].target_scores([(p, row, t) for p in candidates[n] for row, t in zip(rows, targets)])
            if train.trust_region > 0 and trainer.plan.nodes[n].output_type == "text":
                outputs = state.result.records[n].outputs
                deferred[(n, "outputs")] = trainer.layers[n].target_scores([(p, r, o) for p in candidates[n] for r, o in zip(rows, outputs)])
        scores = trainer.run_calls(stage, "candidate_scoring", deferred, by=lambda key: key[0])
        selections: dict[str, Selection[Params]] = {}
        b = len(state.batch)
        for n in names:
            flat = scores[(n, "targets")]
            per_candidate = [flat[i : i + b] for i in range(0, len(flat), b)]
            current_outputs = None
            if (n, "outputs") in scores:
                flat = scores[(n, "outputs")]
                current_outputs = [flat[i : i + b] for i in range(0, len(flat), b)]
            shown = self.batch_demos(trainer, n, state)
            masks = [[d not in set(p.demos) for d in shown] for p in candidates[n]] if shown else None
            chosen = select_candidate(candidates[n], per_candidate, train.trust_region, current_outputs, masks)
            selections[n] = Selection(chosen.candidate, chosen.index, chosen.objective, chosen.loss, dropped[n])
            log.info(
                "iteration %d %s: candidate %d of %d (objective %s; dropped %s)",
                iteration, n, chosen.index, len(candidates[n]), [round(x, 3) for x in chosen.objective], dropped[n],
            )  # fmt: skip
        return selections

    # ------------------------------------------------------------------ demonstrations

    def demo_candidates(
        self, trainer: "Trainer", name: str, current: Params, state: "Pass", iteration: int
    ) -> list[Params]:
        """Demonstration sets to try with the current instruction: balanced redraw,
        bootstrapped (correct batch examples first), one swap, in turn."""
        node = trainer.plan.nodes[name].spec
        spec = node.demos if isinstance(node, LayerNode) else None
        if spec is None or not spec.search:
            return []
        everything = demos.pool(trainer.plan, name)
        if not everything:  # a node without labels keeps its given demonstrations
            return []
        shown = self.batch_demos(trainer, name, state)
        outputs = state.result.records[name].outputs
        metric = trainer.plan.spec.metric
        correct = [d for d, out, t in zip(shown, outputs, state.targets[name]) if metrics.is_correct(metric, out, t)]
        out = []
        for j in range(trainer.train.demo_candidates):
            move = DEMO_MOVES[j % len(DEMO_MOVES)]
            rng = rng_for(trainer.seed, iteration, f"demos/{name}/{j}")
            if move == "redraw":
                chosen = demos.balanced(everything, spec.count, rng)
            elif move == "bootstrap":
                chosen = demos.balanced(everything, spec.count, rng, first=correct)
            else:
                chosen = demos.swap(current.demos, everything, rng)
            out.append(Params(current.prompt, chosen))
        return out

    @staticmethod
    def batch_demos(trainer: "Trainer", name: str, state: "Pass") -> list[Demo]:
        """Each batch example as node `name` would show it as a demonstration ([] without demos)."""
        node = trainer.plan.nodes[name]
        if not isinstance(node.spec, LayerNode) or node.spec.demos is None or node.target is None:
            return []
        return [demos.as_demo(ex, node.inputs, node.target) for ex in state.batch]
