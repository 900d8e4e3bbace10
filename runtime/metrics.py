"""Whether a prediction matches its target, per the spec's `metric`."""

from __future__ import annotations

import re
import string


def normalize(text: str) -> str:
    """Lower case, no surrounding punctuation, single spaces (SQuAD-style, lighter)."""
    return re.sub(r"\s+", " ", text.strip().strip(string.punctuation + " ").lower())


def is_correct(metric: str, prediction: str, target: str) -> bool:
    if metric == "exact_match":
        return normalize(prediction) == normalize(target)
    return prediction.strip() == target.strip()  # accuracy: labels must match exactly
