"""Routing fidelity of a MoE candidate: does it send tokens to the same experts as the base?

Per layer, on the same positions: exact top-k set agreement, Jaccard of the
top-k sets, top-1 agreement, KL between the router distributions, and expert
load histograms (dead or overloaded experts) for base and candidate.  Flips
are split by the base's margin between its k-th and (k+1)-th expert
probability, so near-ties are told apart from real damage.

Input is raw router logits (positions x experts) from llama.cpp's eval
callback (``ffn_moe_logits``, before any router bias) or torch; the top-k set
is compared as a set (llama.cpp's ``top_k`` returns it in no particular order).
A :class:`Gate` turns them into the experts the architecture selects, as
llama.cpp's ``build_moe_ffn`` does: the router bias (gpt-oss), the gating
function (softmax, sigmoid, ...), the selection bias (DeepSeek V3's
``e_score_correction_bias``: ``exp_probs_b``, added for the choice only) and
group-limited top-k (``n_group`` / ``topk_group``: the groups with the best sum
of their two best scores).  Shared experts are always on: nothing to compare;
nor are hash-routed layers (DeepSeek V4's leading blocks: the experts are the
token's row of ``ffn_gate_tid2eid``, the same table in both files), which are
left out of the fidelity figures and marked in the per-layer list.

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


#: llama.cpp's llama_expert_gating_func_type
GATING = {1: "softmax", 2: "sigmoid", 3: "softmax_weight", 4: "sqrt_softplus"}
#: the gating of architectures whose graph does not read expert_gating_func (the rest default to softmax)
ARCH_GATING = {"gpt-oss": "softmax_weight", "llama4": "sigmoid"}


@dataclass(frozen=True)
class Gate:
    """How one architecture turns router logits into its choice of experts (defaults: plain softmax top-k)."""

    gating: str = "softmax"
    logit_bias: tuple[np.ndarray | None, ...] = ()  # per MoE layer: ffn_gate_inp.bias, added to the logits
    select_bias: tuple[np.ndarray | None, ...] = ()  # per MoE layer: exp_probs_b, added to the probabilities for the choice
    n_group: int = 1
    n_group_used: int = 1
    select_on_logits: bool = False  # llama4: top-k of the logits, the sigmoid applied after
    hashed: tuple[bool, ...] = ()  # per MoE layer: experts chosen by token id (ffn_gate_tid2eid), not by the router

    @classmethod
    def from_gguf(cls, path: Any) -> Gate:
        """The gate of a GGUF model (its keys and bias tensors, read from the file)."""
        from quantkit.format.gguf_read import read_gguf

        g = read_gguf(path)
        arch = g.metadata.get("general.architecture", "")
        func = g.metadata.get(f"{arch}.expert_gating_func")
        gating = GATING.get(func, ARCH_GATING.get(arch, "softmax")) if isinstance(func, int) else ARCH_GATING.get(arch, "softmax")
        by_name = {t.name: t for t in g.tensors}
        blocks = sorted({int(t.name.split(".")[1]) for t in g.tensors if t.name.endswith("ffn_gate_inp.weight")})

        def vectors(suffix: str) -> tuple[np.ndarray | None, ...]:
            out: list[np.ndarray | None] = []
            for b in blocks:
                t = by_name.get(f"blk.{b}.{suffix}")
                if t is None:
                    out.append(None)
                    continue
                file, at = g.locate(t)
                if t.qtype != 0:  # F32, as converters keep them
                    raise ValueError(f"{path}: {t.name} is not F32")
                out.append(np.fromfile(file, dtype=np.float32, count=t.n_elements, offset=at).astype(np.float64))
            return tuple(out)

        def count(key: str) -> int:
            v = g.metadata.get(f"{arch}.{key}")
            return int(v) if isinstance(v, int) and v > 0 else 1

        hashed = tuple(f"blk.{b}.ffn_gate_tid2eid.weight" in by_name for b in blocks)
        return cls(gating, vectors("ffn_gate_inp.bias"), vectors("exp_probs_b.bias"), count("expert_group_count"),
                   count("expert_group_used_count"), arch == "llama4", hashed if any(hashed) else ())

    def is_hashed(self, layer: int) -> bool:
        return layer < len(self.hashed) and self.hashed[layer]

    @property
    def plain(self) -> bool:
        """Top-k of the logits is the choice (no bias, no groups): the softmax path of old."""
        return not any(b is not None for b in self.logit_bias + self.select_bias) and self.n_group <= 1

    def describe(self) -> str:
        parts = [self.gating]
        if any(b is not None for b in self.logit_bias):
            parts.append("router bias")
        if any(b is not None for b in self.select_bias):
            parts.append("selection bias")
        if self.n_group > 1:
            parts.append(f"top {self.n_group_used} of {self.n_group} groups")
        if any(self.hashed):
            parts.append(f"{sum(self.hashed)} hash-routed layer(s) not compared")
        return " + ".join(parts)

    def scores(self, logits: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(probs, selection): a distribution over the experts (for KL-divergence) and the scores whose top-k is the choice."""
        x = logits.astype(np.float64)
        if layer < len(self.logit_bias) and self.logit_bias[layer] is not None:
            x = x + self.logit_bias[layer]
        if self.gating == "sigmoid":
            p = 1.0 / (1.0 + np.exp(-x))
        elif self.gating == "sqrt_softplus":
            p = np.sqrt(np.logaddexp(0.0, x))
        else:  # softmax, softmax_weight: the softmax of the logits (softmax_weight normalises the chosen ones only)
            p = softmax(x)
        sel = x if self.select_on_logits or self.gating == "softmax_weight" else p
        if layer < len(self.select_bias) and self.select_bias[layer] is not None:
            sel = sel + self.select_bias[layer]
        if self.n_group > 1 and sel.shape[-1] % self.n_group == 0:
            grouped = sel.reshape(*sel.shape[:-1], self.n_group, -1)
            top2 = -np.sort(-grouped, axis=-1)[..., :2].sum(-1)  # each group's two best scores
            keep = topk_sets(top2, min(self.n_group_used, self.n_group))
            sel = np.where(np.repeat(keep, grouped.shape[-1], axis=-1), sel, -np.inf)
        probs = p if self.gating in ("softmax", "softmax_weight") else p / p.sum(-1, keepdims=True)
        return probs, sel


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
    gate: Gate = field(default_factory=Gate)
    layer: int = 0  # this MoE layer's index in the gate's per-layer biases

    def __post_init__(self) -> None:
        self.load_base = np.zeros(self.n_experts, dtype=np.int64)
        self.load_cand = np.zeros(self.n_experts, dtype=np.int64)
        self.bin_n = np.zeros(len(MARGIN_EDGES) - 1, dtype=np.int64)
        self.bin_flips = np.zeros(len(MARGIN_EDGES) - 1, dtype=np.int64)

    def add(self, base_logits: np.ndarray, cand_logits: np.ndarray) -> None:
        pb, selb = self.gate.scores(base_logits, self.layer)
        pc, selc = self.gate.scores(cand_logits, self.layer)
        sb, sc = topk_sets(selb, self.k), topk_sets(selc, self.k)
        same = (sb == sc).all(-1)
        inter, union = (sb & sc).sum(-1), (sb | sc).sum(-1)
        self.n += len(pb)
        self.exact += int(same.sum())
        self.top1 += int((selb.argmax(-1) == selc.argmax(-1)).sum())
        self.jaccard += float((inter / union).sum())
        self.router_kl += float((pb * (np.log(pb + 1e-30) - np.log(pc + 1e-30))).sum())
        self.load_base += sb.sum(0)
        self.load_cand += sc.sum(0)
        if self.k < self.n_experts:
            srt = -np.sort(-selb, axis=-1)  # the margin of the choice: scores of the k-th and (k+1)-th expert
            margin = np.nan_to_num(srt[:, self.k - 1] - srt[:, self.k], posinf=1.0)
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

    gate: Gate = field(default_factory=Gate)

    @classmethod
    def empty(cls, n_layers: int, n_experts: int, k: int, gate: Gate | None = None) -> RoutingStats:
        gate = gate or Gate()
        return cls([LayerStats(n_experts, k, gate=gate, layer=i) for i in range(n_layers)], gate)

    def add(self, base: np.ndarray, cand: dict[int, np.ndarray]) -> None:
        """``base``: (layers, positions, experts); ``cand``: layer -> (positions, experts)."""
        for layer, stats in enumerate(self.layers):
            if self.gate.is_hashed(layer):
                continue  # the token's table row chooses: the same in both files
            if layer not in cand:
                raise ValueError(f"candidate produced no router logits for layer {layer}")
            stats.add(base[layer], cand[layer])

    def summary(self) -> dict[str, Any]:
        per = [{"hash_routed": True} if self.gate.is_hashed(i) else s.summary() for i, s in enumerate(self.layers)]
        routed = [p for p in per if "hash_routed" not in p]
        if not routed:  # every MoE layer hash-routed: nothing the router chooses
            return {"k": self.layers[0].k if self.layers else 0, "gate": self.gate.describe(), "layers": per}
        mean = lambda key: float(np.mean([p[key] for p in routed]))  # noqa: E731
        return {
            "k": self.layers[0].k if self.layers else 0,
            "gate": self.gate.describe(),
            "topk_exact": mean("topk_exact"),
            "topk_exact_min": float(min(p["topk_exact"] for p in routed)),
            "topk_jaccard": mean("topk_jaccard"),
            "top1": mean("top1"),
            "router_kld": mean("router_kld"),
            "dead_experts_cand": int(sum(p["dead_experts_cand"] for p in routed)),
            "layers": per,
        }
