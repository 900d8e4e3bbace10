"""DSPy's COPRO or MIPROv2 (zero-shot instruction optimization) on the local server.

Runs in the DSPy venv (benchmarks/peers/setup_peers.sh):

    /work/peers-venv/dspy/bin/python benchmarks/peers/dspy_peer.py --optimizer copro \
        --task mpqa --base-url http://127.0.0.1:PORT/v1 --model smollm2 \
        --iterations 3 --proposals 5 --batch-size 10 --dev 50 --test 100 --out r.json

Budget mapping (README.md); `proposals` counts candidates including the current
prompt, as DLN's num_p_samples and dlngraph's prompt_proposals do. COPRO:
depth = iterations, breadth = proposals (its first round proposes breadth-1 and
keeps the initial instruction), every candidate scored on the dev subset.
MIPROv2: iterations x (proposals-1) + 1 instruction candidates, iterations x
proposals trials on minibatches of batch-size, a full dev evaluation every
`proposals` trials; no demonstrations (zero-shot).

`--adapter lenient` keeps DSPy's ChatAdapter but, when a reply lacks DSPy's
`[[ ## field ## ]]` markers (most replies of a 135M model), reads the first
label word as the answer and the whole reply as a proposed instruction instead
of failing. That is NOT DSPy behaviour; the table labels it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROPOSAL_TOKENS, PeerResult, Task, TASKS, add_budget_args, budget_from, correct, load_split  # noqa: E402

ANSWER_TOKENS = 32  # room for DSPy's answer and completed markers


MIPRO_TRAIN = 100


def lenient_adapter(task: Task):
    import dspy
    from dspy.utils.exceptions import AdapterParseError

    class LenientChatAdapter(dspy.ChatAdapter):
        def __init__(self) -> None:
            super().__init__(use_json_adapter_fallback=False)

        def parse(self, signature, completion: str) -> dict[str, Any]:
            try:
                return super().parse(signature, completion)
            except AdapterParseError:
                text = re.sub(r"\[\[ ## \w+ ## \]\]", " ", completion).strip()
                fields = list(signature.output_fields)
                if fields == ["answer"]:
                    return {"answer": first_label(task, text)}
                # an instruction proposal: the reply is the instruction, keep the old prefix
                return {fields[0]: text, **{f: "" for f in fields[1:]}}

    return LenientChatAdapter()


def first_label(task: Task, text: str) -> str:
    """The allowed label mentioned first in `text` ('' when none is)."""
    hits = [(m.start(), label) for label in task.labels
            for m in [re.search(re.escape(label.strip("()")), text, re.IGNORECASE)] if m]
    return min(hits)[1] if hits else ""


def make_lm(args, max_tokens: int, temperature: float):
    import dspy

    # engine lm15 sends n requests for n candidates (the server ignores `n`); the
    # proxy maps its max_completion_tokens to the max_tokens the server reads.
    return dspy.LM(f"openai/{args.model}", api_base=args.base_url, api_key="EMPTY", cache=False,
                   engine="lm15", temperature=temperature, max_tokens=max_tokens)


def examples(task: Task, split: str, limit: int | None):
    import dspy

    return [dspy.Example(input=r["input"], answer=r["target"]).with_inputs("input")
            for r in load_split(task.name, split, limit)]


def accuracy(program, data, metric) -> float:
    import dspy

    return dspy.Evaluate(devset=data, metric=metric, num_threads=4, max_errors=len(data) + 1,
                         display_progress=False)(program).score / 100.0


def optimize(optimizer: str, program, budget, train, dev, metric, prompt_lm):
    from dspy.teleprompt import COPRO, MIPROv2

    if optimizer == "copro":
        teleprompter = COPRO(prompt_model=prompt_lm, metric=metric, breadth=budget.proposals,
                             depth=budget.iterations, init_temperature=0.7)
        return teleprompter.compile(program, trainset=dev, eval_kwargs={"num_threads": 4})
    trials = budget.iterations * budget.proposals
    candidates = budget.iterations * (budget.proposals - 1) + 1
    teleprompter = MIPROv2(metric=metric, prompt_model=prompt_lm, auto=None, num_candidates=candidates,
                           max_bootstrapped_demos=0, max_labeled_demos=0, num_threads=4,
                           max_errors=10**6, seed=budget.seed, init_temperature=0.7)
    # MIPROv2 walks its trainset to bootstrap demos for the proposer until 3 pass
    # the metric; with a 135M model that can be the whole set, so it gets 100.
    return teleprompter.compile(program, trainset=train[:MIPRO_TRAIN], valset=dev, num_trials=trials,
                                minibatch_size=budget.batch_size,
                                minibatch_full_eval_steps=budget.proposals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_budget_args(parser)
    parser.add_argument("--optimizer", required=True, choices=("copro", "miprov2"))
    parser.add_argument("--adapter", default="lenient", choices=("chat", "lenient"))
    args = parser.parse_args()
    budget = budget_from(args)
    task = TASKS[args.task]

    import dspy

    adapter = lenient_adapter(task) if args.adapter == "lenient" else dspy.ChatAdapter()
    # a reply DSPy cannot parse scores 0 instead of stopping the run
    dspy.configure(lm=make_lm(args, ANSWER_TOKENS, 0.0), adapter=adapter, max_errors=10**6)
    signature = dspy.Signature("input -> answer", task.instruction)
    program = dspy.Predict(signature)

    def metric(example, prediction, trace=None) -> bool:
        return correct(task, str(getattr(prediction, "answer", "")), example.answer)

    test = examples(task, "test", budget.test)
    initial = accuracy(program, test, metric)
    fitted = optimize(args.optimizer, program, budget, examples(task, "train", None),
                      examples(task, "dev", budget.dev), metric, make_lm(args, PROPOSAL_TOKENS, 0.7))
    final = accuracy(fitted, test, metric)
    PeerResult(
        system=f"dspy-{args.optimizer}" + ("" if args.adapter == "chat" else " (lenient parse)"),
        task=args.task, initial_test_acc=initial, final_test_acc=final,
        final_prompt=fitted.signature.instructions,
        notes=[f"dspy {dspy.__version__}, adapter {args.adapter}"],
    ).write(args.out)


if __name__ == "__main__":
    main()
