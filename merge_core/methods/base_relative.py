"""Other methods relative to a base model: sce, ram, ramplus_tl, model_stock, nearswap, arcee_fusion.

They work on whole tensors in the compute dtype; none streams over chunks or shares the task arithmetic
machinery.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from merge_core.methods.registry import REQUIRED, non_base, register


@register("sce", params={"int8_mask": False, "select_topk": 1.0}, requires_base=True)
def sce(tensors, base, model_params, params, ctx):
    """SCE: keep the entries whose task vectors vary most across models, elect signs, weight each model
    by its mean squared delta."""
    origin = tensors[base]
    others = non_base(tensors, base)
    if not others:
        return origin
    deltas = torch.stack([tensors[i] - origin for i in others])
    fraction = params["select_topk"]
    if fraction < 1:
        variance = torch.var(deltas, dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance) * fraction) if fraction > 0 else 0
        mask = torch.zeros(variance.numel(), dtype=deltas.dtype)
        if k:
            mask[torch.topk(variance.abs().view(-1), k=k).indices] = 1
        deltas = deltas * mask.view(variance.shape)
    majority = torch.where(deltas.sum(0) >= 0, 1, -1).to(deltas.dtype)
    agrees = deltas.sign() == majority
    energy = deltas.square().reshape(len(others), -1).mean(dim=1)
    total = energy.sum().item()
    weights = torch.ones_like(energy) / len(others) if abs(total) < 1e-6 else energy / total
    weights = weights.view(-1, *[1] * origin.dim()) * agrees
    return origin + (deltas * weights).sum(0) / weights.sum(0).clamp(min=1e-6)


def _ram_vectors(tensors, base, epsilon):
    """Task vectors zeroed below ``epsilon``, with masks of entries changed by one model or by several."""
    deltas = torch.stack([tensors[i] - tensors[base] for i in non_base(tensors, base)]).flatten(1)
    changed = deltas.abs() > epsilon
    contributors = changed.sum(dim=0, keepdim=True)
    return deltas * changed, changed, contributors, contributors > 1, contributors == 1


@register("ram", params={"epsilon": 1e-5}, requires_base=True)
def ram(tensors, base, model_params, params, ctx):
    """Reinforced Agent Merging: entries changed by one model take its delta, shared ones the average."""
    if len(tensors) == 1:
        return tensors[base]
    deltas, _, contributors, shared, unique = _ram_vectors(tensors, base, params["epsilon"])
    merged = (deltas * unique + deltas * shared / contributors.clamp(min=1)).sum(dim=0)
    return tensors[base] + merged.reshape(tensors[base].shape)


@register("ramplus_tl", params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, requires_base=True)
def ramplus_tl(tensors, base, model_params, params, ctx):
    """RAM+ (tensor-local): also boosts each model's unique entries by its shared/unique overlap ratio."""
    if len(tensors) == 1:
        return tensors[base]
    epsilon = params["epsilon"]
    deltas, changed, contributors, shared, unique = _ram_vectors(tensors, base, epsilon)
    ratio = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + params["r"] * ratio.clamp(min=0, max=params["alpha"])
    merged = (deltas * unique * boost.unsqueeze(-1) + deltas * shared / contributors.clamp(min=1)).sum(dim=0)
    return tensors[base] + merged.reshape(tensors[base].shape)


@register("model_stock", params={"filter_wise": False}, requires_base=True, min_models=3)
def model_stock(tensors, base, model_params, params, ctx):
    """Model Stock: move from the base toward the models' average by t = k·cosθ / (1 + (k−1)·cosθ),
    cosθ the mean pairwise cosine of the task vectors (per row with ``filter_wise``)."""
    origin = tensors[base]
    def flat(t: torch.Tensor) -> torch.Tensor:
        if not params["filter_wise"]:
            return t.reshape(-1)
        return t.unsqueeze(0) if origin.dim() == 1 else t

    w0 = flat(origin)
    models = [flat(tensors[i]) for i in non_base(tensors, base)]
    deltas = [m - w0 for m in models]
    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(models)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, k * cos / torch.where(singular, 1, denominator))
    return (t * (sum(models) / k) + (1 - t) * w0).reshape(origin.shape)


@register("nearswap", params={"t": REQUIRED}, requires_base=True, min_models=2, max_models=2)
def nearswap(tensors, base, model_params, params, ctx):
    """Take the other model's value where it is within ``t`` of the base, interpolate beyond."""
    a, b = tensors[base], tensors[1 - base]
    weight = (params["t"] / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


_FUSION_SAMPLE = 1_000_000


@register("arcee_fusion", requires_base=True, min_models=2, max_models=2)
def arcee_fusion(tensors, base, model_params, params, ctx):
    """Keep the other model's change only where its importance (|Δ| × KL of the softmaxed rows) is an
    upper outlier: above median + 1.5·IQR, quantiles from a ≤1M sample drawn with ``ctx.generator``."""
    origin, other = tensors[base], tensors[1 - base]
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(origin, dim=-1) + 1e-8
    importance = (other - origin).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    sample = importance.reshape(-1)
    if sample.numel() > _FUSION_SAMPLE:
        sample = sample[torch.randint(sample.numel(), (_FUSION_SAMPLE,), generator=ctx.generator)]
    ordered = torch.sort(sample).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return origin + (other - origin) * mask
