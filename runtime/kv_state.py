"""The learned state of a Deep-Thinking node: attention keys/values per layer.

`KVState` holds, for every decoder layer, the keys and values the model
"thought" over its demonstrations (fp32, [1, kv_heads, L, head_dim]), plus the
metadata that says what produced them. It saves as one safetensors file whose
string metadata records the model identity, tokenizer, eta, beta, the number
of thinking steps T, the length L, the dtype and the sha256 of the rendered
demonstrations. `load_state` reads a file back only if it was made from the
same demonstrations, model and hyperparameters; otherwise it refuses with a
`RuntimeFailure` naming every field that differs.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import MISSING, asdict, dataclass, fields, replace
from functools import cache as memoize
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from transformers import DynamicCache

from dlngraph.errors import RuntimeFailure
from dlngraph.runtime.files import write_atomic

FORMAT = "dlngraph-deep-thinking/1"


@memoize
def cache_keyword(forward: Any) -> str:
    """The name a model's forward takes its KV cache by: transformers 5.x renamed
    `past_key_values` to `cache` and warns on the old name (removal in 5.40)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def forward_with_cache(
    module: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: Any,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """`module(...)` (a base model or a causal LM) appending to `cache` in place;
    returns (the module's output, the cache). Every call that hands the model a
    cache goes through here, so the keyword is chosen in one place."""
    device = module.device
    out = module(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        **{cache_keyword(type(module).forward): cache},
        **kwargs,
    )
    return out, cache


@dataclass(frozen=True)
class StateMeta:
    """What produced a state; every field is compared when a saved state is reused."""

    node: str
    model: str  # the backend's model identity (weights digest, dtype, mode)
    tokenizer: str
    eta: float
    beta: float
    steps: int  # T: forward passes over the demonstrations
    length: int  # L: tokens of the rendered demonstrations
    dtype: str  # of the stored tensors
    demos_sha256: str  # of the rendered demonstrations text
    # T selected on dev depends on how the choices were scored; files written
    # before the field existed were uncalibrated.
    calibration: str = "none"

    def to_strings(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_strings(cls, raw: dict[str, str]) -> "StateMeta":
        types = {f.name: f.type for f in fields(cls)}
        convert = {"int": int, "float": float, "str": str}
        defaults = {f.name: str(f.default) for f in fields(cls) if f.default is not MISSING}
        return cls(**{k: convert[types[k]](raw.get(k, defaults.get(k))) for k in types})


@dataclass
class KVState:
    keys: list[torch.Tensor]  # per layer [1, kv_heads, L, head_dim]
    values: list[torch.Tensor]
    meta: StateMeta

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[-2])

    def cache(self, *, dtype: torch.dtype, device: torch.device | str) -> DynamicCache:
        """A fresh cache holding the state (a forward appends new tensors to it; the state's stay as they are)."""
        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype), layer)
        return cache

    def digest(self) -> str:
        """sha256 of the tensors (shape, dtype and bytes): names the state by its
        content, so score requests naming it can be cached safely."""
        sha = hashlib.sha256()
        for tensor in [*self.keys, *self.values]:
            host = tensor.detach().contiguous().cpu()
            sha.update(f"{tuple(host.shape)}{host.dtype}".encode())
            sha.update(host.view(torch.uint8).numpy().tobytes())
        return sha.hexdigest()

    def clone(self, **changes: object) -> "KVState":
        return KVState(
            [k.clone() for k in self.keys], [v.clone() for v in self.values], replace(self.meta, **changes)
        )

    def save(self, path: Path) -> None:
        """Write atomically: a reader never sees half a state."""
        tensors = {f"k.{i}": k.contiguous().cpu() for i, k in enumerate(self.keys)}
        tensors.update({f"v.{i}": v.contiguous().cpu() for i, v in enumerate(self.values)})
        write_atomic(path, save(tensors, metadata={"format": FORMAT, **self.meta.to_strings()}))

    @classmethod
    def load(cls, path: Path) -> "KVState":
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
                if raw.get("format") != FORMAT:
                    raise RuntimeFailure(
                        f"{path} is not a Deep-Thinking state (format {raw.get('format')!r})",
                        hint="delete it, or point the run at the directory `dlngraph fit` wrote",
                    )
                layers = len([k for k in f.keys() if k.startswith("k.")])
                keys = [f.get_tensor(f"k.{i}") for i in range(layers)]
                values = [f.get_tensor(f"v.{i}") for i in range(layers)]
            return cls(keys, values, StateMeta.from_strings(raw))
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise RuntimeFailure(f"could not read Deep-Thinking state {path}: {exc!r}") from exc


def load_state(path: Path, expected: StateMeta, *, compare_steps: bool) -> KVState:
    """The state saved at `path`, if it was produced like `expected` would be.

    `compare_steps` is False when T was selected on dev (the file then says
    which T won); every other field must match exactly.
    """
    state = KVState.load(path)
    skip = set() if compare_steps else {"steps"}
    saved, wanted = state.meta.to_strings(), expected.to_strings()
    differ = sorted(k for k in wanted if k not in skip and saved[k] != wanted[k])
    if differ:
        detail = "; ".join(f"{k}: saved {_short(saved[k])}, now {_short(wanted[k])}" for k in differ)
        what = "demonstrations changed" if "demos_sha256" in differ else "settings changed"
        raise RuntimeFailure(
            f"the saved Deep-Thinking state {path} does not match this node ({what}: {detail})",
            node=expected.node,
            hint="delete the file to think again, or use a fresh run directory",
        )
    return state


def _short(value: str) -> str:
    return value[:12] if len(value) == 64 else value
