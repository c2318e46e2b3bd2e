"""Routing fidelity of a MoE candidate: does it send tokens to the same experts as the base?

Per layer, on the same positions: exact top-k set agreement, Jaccard of the
top-k sets, top-1 agreement, KL between the router distributions, and expert
load histograms (dead or overloaded experts) for base and candidate.  Flips
are split by the base's margin between its k-th and (k+1)-th expert
probability, so near-ties are told apart from real damage.

Input is raw router logits (positions x experts) from llama.cpp's eval
callback or torch; the top-k set is compared as a set (llama.cpp's ``top_k``
returns it in no particular order).

Not for: token-level statistics (``quantkit.evals.kld``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Base margin p_k - p_{k+1} bins: near-ties first.
MARGIN_EDGES = (0.0, 0.01, 0.05, 0.2, 1.01)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = np.exp(x - x.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


def topk_sets(probs: np.ndarray, k: int) -> np.ndarray:
    """Boolean (positions, experts) mask of each position's top-k experts."""
    idx = np.argpartition(-probs, k - 1, axis=-1)[:, :k]
    mask = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


@dataclass
class LayerStats:
    n_experts: int
    k: int
    n: int = 0
    exact: int = 0
    top1: int = 0
    jaccard: float = 0.0
    router_kl: float = 0.0
    load_base: np.ndarray = field(default=None)  # type: ignore[assignment]
    load_cand: np.ndarray = field(default=None)  # type: ignore[assignment]
    bin_n: np.ndarray = field(default=None)  # type: ignore[assignment]
    bin_flips: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.load_base = np.zeros(self.n_experts, dtype=np.int64)
        self.load_cand = np.zeros(self.n_experts, dtype=np.int64)
        self.bin_n = np.zeros(len(MARGIN_EDGES) - 1, dtype=np.int64)
        self.bin_flips = np.zeros(len(MARGIN_EDGES) - 1, dtype=np.int64)

    def add(self, base_logits: np.ndarray, cand_logits: np.ndarray) -> None:
        pb, pc = softmax(base_logits), softmax(cand_logits)
        sb, sc = topk_sets(pb, self.k), topk_sets(pc, self.k)
        same = (sb == sc).all(-1)
        inter, union = (sb & sc).sum(-1), (sb | sc).sum(-1)
        self.n += len(pb)
        self.exact += int(same.sum())
        self.top1 += int((pb.argmax(-1) == pc.argmax(-1)).sum())
        self.jaccard += float((inter / union).sum())
        self.router_kl += float((pb * (np.log(pb + 1e-30) - np.log(pc + 1e-30))).sum())
        self.load_base += sb.sum(0)
        self.load_cand += sc.sum(0)
        if self.k < self.n_experts:
            srt = -np.sort(-pb, axis=-1)
            margin = srt[:, self.k - 1] - srt[:, self.k]
            bins = np.clip(np.searchsorted(MARGIN_EDGES, margin, side="right") - 1, 0, len(self.bin_n) - 1)
            self.bin_n += np.bincount(bins, minlength=len(self.bin_n))
            self.bin_flips += np.bincount(bins, weights=~same, minlength=len(self.bin_n)).astype(np.int64)

    def summary(self) -> dict[str, Any]:
        fair = self.n * self.k / self.n_experts
        share = lambda load: (load / max(1, load.sum())).round(4).tolist()  # noqa: E731
        return {
            "positions": self.n,
            "topk_exact": self.exact / max(1, self.n),
            "topk_jaccard": self.jaccard / max(1, self.n),
            "top1": self.top1 / max(1, self.n),
            "router_kld": self.router_kl / max(1, self.n),
            "load_base": share(self.load_base),
            "load_cand": share(self.load_cand),
            "dead_experts_base": int((self.load_base == 0).sum()),
            "dead_experts_cand": int((self.load_cand == 0).sum()),
            "overloaded_experts_cand": int((self.load_cand > 2 * fair).sum()),
            "flips_by_margin": [
                {"margin": [MARGIN_EDGES[i], min(1.0, MARGIN_EDGES[i + 1])], "positions": int(self.bin_n[i]), "flip_rate": float(self.bin_flips[i] / self.bin_n[i]) if self.bin_n[i] else None}
                for i in range(len(self.bin_n))
            ],
        }


@dataclass
class RoutingStats:
    layers: list[LayerStats]

    @classmethod
    def empty(cls, n_layers: int, n_experts: int, k: int) -> RoutingStats:
        return cls([LayerStats(n_experts, k) for _ in range(n_layers)])

    def add(self, base: np.ndarray, cand: dict[int, np.ndarray]) -> None:
        """``base``: (layers, positions, experts); ``cand``: layer -> (positions, experts)."""
        for layer, stats in enumerate(self.layers):
            if layer not in cand:
                raise ValueError(f"candidate produced no router logits for layer {layer}")
            stats.add(base[layer], cand[layer])

    def summary(self) -> dict[str, Any]:
        per = [s.summary() for s in self.layers]
        mean = lambda key: float(np.mean([p[key] for p in per]))  # noqa: E731
        return {
            "k": self.layers[0].k if self.layers else 0,
            "topk_exact": mean("topk_exact"),
            "topk_exact_min": float(min(p["topk_exact"] for p in per)),
            "topk_jaccard": mean("topk_jaccard"),
            "top1": mean("top1"),
            "router_kld": mean("router_kld"),
            "dead_experts_cand": int(sum(p["dead_experts_cand"] for p in per)),
            "layers": per,
        }
