"""Softmax and top-k: the last step of the Tail, done in the enclave (labels never leave it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    prob: float

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "label": self.label, "prob": self.prob}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def top_k(scores: np.ndarray, labels: list[str], k: int, *, already_probabilities: bool = False) -> list[Prediction]:
    """Top-k classes of one image's scores (logits unless `already_probabilities`)."""
    probs = scores.astype(np.float64) if already_probabilities else softmax(scores)
    k = max(1, min(k, probs.shape[-1]))
    order = np.argsort(-probs, kind="stable")[:k]
    return [Prediction(int(i), labels[int(i)], float(probs[int(i)])) for i in order]
