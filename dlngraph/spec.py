"""The spec language: pydantic models of a dlngraph YAML file.

Defaults live here and only here (never in the CLI). Every model forbids
unknown keys, so a typo is an error with a did-you-mean, not a silent default.
This module imports nothing of the project.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
)

SPEC_VERSION = 1
SPLITS = ("train", "dev", "test")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- backends


class TorchBackendSpec(_Model):
    """Local transformers model; the default is the embedded SmolLM2-135M-Instruct."""

    kind: Literal["torch"] = "torch"
    model: str = Field("embedded", description="'embedded' or a local Hugging Face model directory")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto': bfloat16 on CUDA, float32 on CPU"
    )
    chat: bool = Field(False, description="wrap prompts in the model's chat template")
    batch_size: int | None = Field(
        None, ge=1, description="examples per forward pass; omit: 16 on CPU, sized to free GPU memory on CUDA"
    )
    compile: bool = Field(
        True, description="on CUDA, decode with a static KV cache and CUDA graphs (torch.compile); eager elsewhere"
    )


class Deployment(_Model):
    """One server of a scaled-out litellm backend."""

    model: str | None = None
    api_base: str
    api_key_env: str | None = None
    weight: int = Field(1, ge=1)


class LiteLLMBackendSpec(_Model):
    """Any provider litellm speaks to, or local OpenAI-compatible servers."""

    kind: Literal["litellm"] = "litellm"
    model: str
    api_base: str | None = None
    api_key_env: str | None = Field(None, description="environment variable holding the API key")
    deployments: list[Deployment] = Field(default_factory=list)
    concurrency: int = Field(8, ge=1)
    timeout: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    max_errors: int = Field(20, ge=1, description="failed calls tolerated before the run stops")
    backoff: float = Field(
        0.5, gt=0, description="seconds before the first retry; doubles per attempt, with jitter"
    )
    cooldown: float = Field(
        10.0, gt=0, description="seconds a failing deployment sits out before the Router tries it again"
    )
    top_logprobs: int | None = Field(
        None,
        ge=1,
        description="next-token alternatives asked for when scoring single-token choices; "
        "default 1000 for your own servers (api_base/deployments), 5 for hosted providers",
    )
    capabilities: list[str] | None = Field(
        None, description="declare capabilities instead of probing the endpoint"
    )
    tokenizer: str | None = Field(
        None,
        description="'embedded' or a local tokenizer directory: lets choice scoring refuse "
        "multi-token choices up front on endpoints that can only score single tokens",
    )


class PluginBackendSpec(BaseModel):
    """A backend kind registered by a third-party package (entry point dlngraph.backends)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str
    capabilities: list[str] | None = None


def _backend_tag(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if kind in ("torch", "litellm") else "plugin"


BackendSpec = Annotated[
    Annotated[TorchBackendSpec, Tag("torch")]
    | Annotated[LiteLLMBackendSpec, Tag("litellm")]
    | Annotated[PluginBackendSpec, Tag("plugin")],
    Discriminator(_backend_tag),
]


# --------------------------------------------------------------------------- data


class DataSpec(_Model):
    """JSONL files, paths relative to the spec file."""

    train: str | None = None
    dev: str | None = None
    test: str | None = None

    def paths(self) -> dict[str, str]:
        return {s: p for s in SPLITS if (p := getattr(self, s)) is not None}


# --------------------------------------------------------------------------- nodes


class TextOutput(_Model):
    type: Literal["text"] = "text"
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stop: list[str] = Field(default_factory=lambda: ["\n\n"])


class ChoiceOutput(_Model):
    type: Literal["choice"] = "choice"
    choices: list[str] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for c in v:
            if not c.strip():
                raise ValueError("choices must be non-empty strings")
            if c in seen:
                raise ValueError(f"duplicate choice {c!r}")
            seen.add(c)
        return v


OutputSpec = Annotated[TextOutput | ChoiceOutput, Field(discriminator="type")]


# The content-free inputs of contextual calibration ("Calibrate Before Use", Zhao et al. 2021);
# the runtime scores them (runtime/calibration.py), the compiler counts them.
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")


class LayerDemos(_Model):
    """Demonstrations a layer shows, rendered into its template as `{{ demos }}`.

    They are a learnable parameter like the prompt: drawn from train only (never
    dev or test), class-balanced and seeded, then searched by `dlngraph fit`."""

    count: int = Field(8, ge=1, le=64, description="k demonstrations shown")
    template: str = Field(
        "{{ input }}\nAnswer: {{ label }}",
        description="renders one demonstration: the dataset inputs and the node's target as `label`",
    )
    separator: str = Field("\n\n", description="text between two rendered demonstrations")
    search: bool = Field(True, description="let `dlngraph fit` change the demonstrations")
    examples: list[dict[str, str]] | None = Field(
        None, description="the starting demonstrations (inputs and `label`) instead of a draw from train; set by export"
    )


class LayerNode(_Model):
    """A language layer: one LLM call whose `prompt` is a learnable parameter."""

    kind: Literal["layer"] = "layer"
    backend: str | None = None
    prompt: str = ""
    template: str
    output: OutputSpec
    trainable: bool = True
    calibration: Literal["none", "contextual", "batch"] = Field(
        "none",
        description="choice nodes: `none`, `contextual` (content-free inputs, Zhao et al. 2021) or "
        "`batch` (mean over unlabeled train inputs, Zhou et al. 2024) label-prior removal",
    )
    calibration_bias: dict[str, float] | None = Field(
        None, description="a fitted label prior (log-probs) to divide out; written by `dlngraph export`"
    )
    demos: LayerDemos | None = Field(None, description="trainable demonstrations, read by the template as `{{ demos }}`")


class Demonstrations(_Model):
    """Where a Deep-Thinking node takes its demonstrations from."""

    # Never test: demonstrations seen by the node would be scored as unseen.
    split: Literal["train", "dev"] = Field("train", description="split the demonstrations are drawn from (not test)")
    count: int = Field(8, ge=1, le=256)
    seed: int = 0
    examples: list[dict[str, str]] | None = Field(
        None, description="an explicit list instead of sampling from a split"
    )


class DeepThinkingNode(_Model):
    """Iterative forward tuning of attention K/V over demonstrations (arXiv 2305.13016)."""

    kind: Literal["deep_thinking"]
    backend: str | None = None
    demonstrations: Demonstrations = Field(default_factory=Demonstrations)
    demo_template: str = Field(description="renders one demonstration (it sees the label as `label`)")
    template: str = Field(description="renders a query; the answer is one of `choices`")
    choices: list[str] = Field(min_length=1)
    label_field: str = "target"
    eta: float = Field(0.01, gt=0.0, le=1.0, description="learning rate of the K/V update")
    beta: float = Field(0.9, ge=0.0, lt=1.0, description="momentum; 0 gives the gate form")
    steps: int | None = Field(None, ge=1, le=64, description="fixed T; omit to select on dev")
    max_steps: int = Field(8, ge=1, le=64, description="largest T tried when selecting on dev")
    select_steps_on: Literal["dev"] | None = "dev"
    calibration: Literal["none", "contextual", "batch"] = Field(
        "none",
        description="label-prior removal on the choice scores, as on choice layers, re-estimated "
        "from each thinking state: `contextual` (content-free inputs) or `batch` (unlabeled train inputs)",
    )

    @field_validator("choices")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return ChoiceOutput._unique(v)

    @property
    def output(self) -> ChoiceOutput:
        return ChoiceOutput(choices=self.choices)


def _node_tag(value: Any) -> str:
    kind = value.get("kind", "layer") if isinstance(value, dict) else getattr(value, "kind", "layer")
    return kind if kind in ("layer", "deep_thinking") else "layer"


NodeSpec = Annotated[
    Annotated[LayerNode, Tag("layer")] | Annotated[DeepThinkingNode, Tag("deep_thinking")],
    Discriminator(_node_tag),
]


# --------------------------------------------------------------------------- training


# One per proposal, in turn: a small model asked N times for "an improved
# instruction" mostly copies the current one; asking for different edits
# (the DLN reference's message alternatives) gives candidates that differ.
PROPOSAL_DIRECTIVES = (
    "Clarify the instruction by adding a few words or a short sentence.",
    "Shorten the instruction by removing words that do not help.",
    "Rewrite the instruction in other words, so that it cannot be misread.",
    "Add to the instruction a short hint, learned from the examples, on how to decide.",
)


class TrainSpec(_Model):
    """Hyperparameters of `dlngraph fit`; defaults follow the DLN paper."""

    iterations: int = Field(20, ge=0)
    batch_size: int = Field(20, ge=1)
    prompt_proposals: int = Field(20, ge=1, description="N candidate prompts per step (incl. current)")
    posterior_samples: int = Field(5, ge=1, description="K posterior samples per example")
    backward_temperature: float = Field(0.7, ge=0.0, le=2.0)
    posterior_temperature: float = Field(1.0, gt=0.0)
    meta_examples: int = Field(5, ge=1, description="successes/failures shown in the meta-prompt")
    proposal_max_tokens: int = Field(96, ge=8)
    proposal_directives: list[str] = Field(
        default_factory=lambda: list(PROPOSAL_DIRECTIVES),
        min_length=1,
        description="how to rewrite: proposal j asks for directive j mod len (diverse edits, as DLN's messages)",
    )
    eval_every: int = Field(1, ge=1)
    dev_size: int | None = Field(None, ge=1, description="dev examples per evaluation (all if omitted)")
    patience: int = Field(5, ge=1)
    seed: int = 42
    trust_region: float = Field(
        0.0, ge=0.0, description="weight of the KL term keeping the new prompt near the old one"
    )
    wrong_hidden_penalty: float = Field(
        0.0, ge=0.0, description="penalty on hidden states that lead the child to a wrong answer"
    )
    proposer: str | None = Field(
        None, description="backend that writes proposals and posterior samples; the node's own if omitted"
    )
    balance_batch: bool = Field(True, description="class-balanced mini-batches (round-robin over the output labels)")
    demo_candidates: int = Field(
        3, ge=0, description="demonstration sets tried per step: a balanced redraw, a bootstrapped set, a swap"
    )
    memory: int = Field(2, ge=0, description="best prompts seen on dev put back in every candidate pool")
    backtrack: int | None = Field(
        2, ge=1, description="evaluations without dev gain after which the fit restarts from the best; none: never"
    )
    calibration_size: int = Field(
        32, ge=1, description="unlabeled train inputs batch calibration is estimated on"
    )


# --------------------------------------------------------------------------- tracking


class MLflowSpec(_Model):
    """Log params, per-iteration metrics and the run directory to MLflow."""

    tracking_uri: str | None = Field(
        None, description="e.g. sqlite:///mlflow.db or http://host:5000; MLflow's default if omitted"
    )
    experiment: str | None = Field(None, description="experiment name; the spec name if omitted")


class TrackingSpec(_Model):
    """Experiment trackers `dlngraph fit` reports to (none by default)."""

    mlflow: MLflowSpec | None = None


# --------------------------------------------------------------------------- the spec


class Spec(_Model):
    version: Literal[1] = SPEC_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    backends: dict[str, BackendSpec] = Field(
        default_factory=lambda: {"local": TorchBackendSpec()}, min_length=1
    )
    default_backend: str | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    inputs: list[str] = Field(min_length=1)
    nodes: dict[str, NodeSpec] = Field(min_length=1)
    outputs: dict[str, str] = Field(min_length=1, description="node -> dataset field it is scored against")
    metric: Literal["accuracy", "exact_match"] = "accuracy"
    train: TrainSpec = Field(default_factory=TrainSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @property
    def resolved_default_backend(self) -> str:
        return self.default_backend or next(iter(self.backends))

    def backend_of(self, node: str) -> str:
        return self.nodes[node].backend or self.resolved_default_backend


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema (what `dlngraph schema` prints)."""
    return Spec.model_json_schema()
