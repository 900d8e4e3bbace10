"""DLN-1 of the Deep Language Networks reference code on the local server.

Runs in the DLN venv (benchmarks/peers/setup_peers.sh), never the project's:

    /work/peers-venv/dln/bin/python benchmarks/peers/dln_reference.py \
        --dln-src /work/peers/dln --task mpqa --base-url http://127.0.0.1:PORT/v1 \
        --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --tokenizer DIR \
        --iterations 3 --proposals 5 --batch-size 10 --dev 50 --test 100 --out r.json

It calls the reference's own `projects/vi_dln/vi_main.py` twice (zero-shot for
the initial test accuracy, then the fit), changing only what the local server
and the shared splits require (each change is listed in README.md):
  * the splits: a Dataset subclass that reads the shared JSONL subsets, so DLN
    sees exactly the examples the other systems see (its own loader resamples);
  * `torch.utils.tensorboard` is served by tensorboardX (no torch here);
  * a fresh AsyncOpenAI client per event loop (the reference reuses one across
    `asyncio.run` calls; its retries then resend many requests);
  * `min_tokens: 1` on the max_tokens=1 scoring requests (an end-of-text first
    token yields empty logprobs and an IndexError in the reference);
  * numpy's global RNG seeded (its prompt sampler draws from it unseeded).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROPOSAL_TOKENS, PeerResult, TASKS, add_budget_args, budget_from, write_subsets  # noqa: E402


def import_vi_main(dln_src: Path):
    """vi_main, its `torch.utils.tensorboard` import served by tensorboardX.

    The stand-in torch modules exist only while vi_main imports: transformers
    and datasets probe for torch later and must find none.
    """
    import tensorboardX

    sys.path[:0] = [str(dln_src), str(dln_src / "projects" / "vi_dln")]
    import dln.dataset  # noqa: F401  (imports `datasets`, which probes for torch, before the stand-in exists)

    torch = types.ModuleType("torch")
    torch.utils = types.ModuleType("torch.utils")
    torch.utils.tensorboard = types.ModuleType("torch.utils.tensorboard")
    torch.utils.tensorboard.SummaryWriter = tensorboardX.SummaryWriter
    stand_ins = {"torch": torch, "torch.utils": torch.utils, "torch.utils.tensorboard": torch.utils.tensorboard}
    sys.modules.update(stand_ins)
    try:
        import vi_main
    finally:
        for name in stand_ins:
            del sys.modules[name]
    return vi_main


def patch_client() -> None:
    import asyncio

    import openai
    from dln import operator

    async def gather(self, inputs, **kwargs):
        # One client per event loop: the reference's single client outlives the
        # loop of the previous asyncio.run and its retries resend requests.
        self.aclient = openai.AsyncOpenAI(api_key=self.api_key, base_url=self.base_url)
        if kwargs.get("max_tokens") == 1:
            kwargs["extra_body"] = {**kwargs.get("extra_body", {}), "min_tokens": 1}
        async with self.aclient:
            return await asyncio.gather(*[self._aget_vllm_response(x, **kwargs) for x in inputs])

    operator.VLLM._gather_vllm_response = gather


def shared_dataset_factory(paths: dict[str, Path]):
    """init_dataset replacement: DLN's Dataset machinery over the shared subsets."""
    import json

    from dln.dataset import Dataset

    class SharedSplits(Dataset):
        def load_dataset(self):
            for split, path in paths.items():
                for line in path.read_text(encoding="utf-8").splitlines():
                    row = json.loads(line)
                    self.dataset[split]["sentence"].append(row["input"])
                    self.dataset[split]["label"].append(row["target"])

    def init_dataset(dataset_id, seed, data_dir, n_few_shots=0, **_sizes):
        # inputs already end with their Options block and targets are label words
        return SharedSplits(data_dir, dataset_id, seed, use_label_mapping=False,
                            append_options=False, n_few_shots=n_few_shots)

    return init_dataset


def run_vi_main(vi_main, args, budget, log_dir: Path, zero_shot: bool) -> str:
    """One vi_main invocation; returns its output.log text."""
    argv = [
        "--dataset", args.task, "--seed", str(budget.seed), "--out_dir", str(log_dir),
        "--one_layer", "True", "--balance_batch", "--val_freq", "1",
        "--iters", str(budget.iterations), "--num_p_samples", str(budget.proposals),
        "--batch_size", str(budget.batch_size), "--bwd_temp", "0.7",
        "--bwd_max_tokens", str(PROPOSAL_TOKENS),
        "--q_prompt", "q_action_prompt:v3.5", "--p_class", "classify_forward:3.0",
        "--output_scoring_function", "logprobs", "--held_out_prompt_ranking", "False",
        "--use_memory", "0", "--tolerance", "-1",
        "--fwd_model_type", args.model, "--bwd_model_type", args.model,
    ]
    argv += ["--do_zero_shot"] if zero_shot else ["--do_first_eval"]
    logging.root.handlers.clear()  # vi_main's basicConfig only takes effect on a bare root logger
    vi_main.main.main(argv, standalone_mode=False)
    return max(log_dir.glob("*/output.log"), key=lambda p: p.stat().st_mtime).read_text()


def final_test_acc(log: str) -> float:
    return float(re.findall(r"TEST ACC: ([0-9.]+)", log)[-1])


def best_prompt(log: str) -> str:
    # output.log prefixes each message with a timestamp; a multi-line prompt runs until the next one
    found = re.findall(r"Best L2 weights: (.*?)\n\d{4}-\d\d-\d\d \d\d:\d\d:\d\d - ", log, re.DOTALL)
    return found[-1].strip() if found else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_budget_args(parser)
    parser.add_argument("--dln-src", required=True, type=Path, help="checkout of microsoft/deep-language-networks")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory of the served model")
    args = parser.parse_args()
    budget = budget_from(args)

    import os

    import numpy as np

    os.environ.update(OPENAI_BASE_URL=args.base_url, OPENAI_API_KEY="EMPTY", TOKENIZER_PATH=args.tokenizer)
    vi_main = import_vi_main(args.dln_src.resolve())
    patch_client()

    with tempfile.TemporaryDirectory(prefix="dln-ref-") as tmp:
        vi_main.init_dataset = shared_dataset_factory(write_subsets(args.task, budget, Path(tmp) / "data"))
        np.random.seed(budget.seed)
        initial = final_test_acc(run_vi_main(vi_main, args, budget, Path(tmp) / "zero", zero_shot=True))
        np.random.seed(budget.seed)
        log = run_vi_main(vi_main, args, budget, Path(tmp) / "fit", zero_shot=False)
    PeerResult(
        system="dln-reference", task=args.task, initial_test_acc=initial,
        final_test_acc=final_test_acc(log), final_prompt=best_prompt(log),
        notes=[f"DLN-1 vi_main, initial instruction: {TASKS[args.task].instruction!r} (its dataset_info)"],
    ).write(args.out)


if __name__ == "__main__":
    main()
