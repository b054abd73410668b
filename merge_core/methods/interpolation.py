"""Interpolations between whole models: linear, slerp, nuslerp, multislerp, karcher.

mergekit runs linear, slerp and the norms of karcher in float32: these up-cast internally (float64 stays
float64) and round once at the end. linear and slerp stream over chunks (``chunking``) so their float32
scratch stays small, and use the compiled weighted sums (``merge_core.native``) where they apply.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from merge_core import native
from merge_core.errors import EvomergeError
from merge_core.methods import chunking
from merge_core.methods.registry import REQUIRED, flat_output, float_dtype, non_base, register, scalar


@register("linear", model_params={"weight": REQUIRED}, params={"normalize": True}, base_is_input=True)
def linear(tensors, base, model_params, params, ctx):
    """Weighted average; accumulates in float32 so bf16 inputs are rounded once. Streams over chunks so
    the float32 accumulator stays cache-sized."""
    weights = torch.tensor([p["weight"] for p in model_params], dtype=float_dtype(tensors[0]))
    flat = [t.reshape(-1) for t in tensors]
    out = flat_output(ctx, tensors[0])
    chunks = chunking.chunks(out.numel())

    too_large = [p["weight"] for p, w in zip(model_params, weights.tolist()) if not math.isfinite(w)]
    if too_large:
        raise EvomergeError(f"tensor {ctx.name}: linear's weight {too_large[0]:g} is beyond the range of "
                            f"{str(weights.dtype).removeprefix('torch.')} (largest finite "
                            f"{torch.finfo(weights.dtype).max:.4g})")
    divisor = weights.sum() if params["normalize"] else None
    if divisor is not None and not (divisor != 0 and torch.isfinite(divisor)):  # mergekit would write NaN
        raise EvomergeError(f"tensor {ctx.name}: linear's weights ({', '.join(f'{w:g}' for w in weights.tolist())}) "
                            f"sum to {float(divisor):g} in {str(weights.dtype).removeprefix('torch.')}, and "
                            f"normalize: true divides by that sum; give weights with a non-zero finite sum, "
                            f"or normalize: false")
    compiled = (weights.dtype == torch.float32 and native.supports(out.dtype, out.device, 1)
                and all(t.dtype == out.dtype and t.device == out.device for t in flat))

    def merge_chunk(j):
        c = chunks[j]
        if compiled:
            native.weighted_sum([t[c] for t in flat], weights.tolist(), out[c], fused=True,
                                divisor=None if divisor is None else float(divisor))
            return
        merged = torch.zeros(len(range(out.numel())[c]), dtype=weights.dtype)
        for tensor, weight in zip(flat, weights):
            merged.addcmul_(tensor[c], weight)
        if divisor is not None:
            merged.div_(divisor)
        out[c] = merged

    with chunking.one_thread():
        chunking.each_chunk(merge_chunk, len(chunks))
    return out.view(tensors[0].shape)


SLERP_CHUNK = 1024 * 1024


@register("slerp", params={"t": REQUIRED}, min_models=2, max_models=2)
def slerp(tensors, base, model_params, params, ctx):
    """Spherical interpolation from the base (t=0) to the other model (t=1); lerp when nearly collinear.

    mergekit requires a base model; without one the first model plays the base. Works in float32 chunks
    so scratch memory stays small whatever the tensor size.
    """
    start = 0 if base is None else base
    if not tensors[start].numel():
        return tensors[start]
    with chunking.one_thread():
        return _slerp_flat(tensors[start].reshape(-1), tensors[1 - start].reshape(-1), params["t"],
                           flat_output(ctx, tensors[start])).view(tensors[start].shape)


def _slerp_flat(a: Tensor, b: Tensor, t: float, out: Tensor) -> Tensor:
    dtype = float_dtype(a)
    t = scalar(t, dtype)
    chunks = [slice(i, i + SLERP_CHUNK) for i in range(0, a.numel(), SLERP_CHUNK)]
    norms = [None] * len(chunks)  # per-chunk results as Python numbers: small tensors kept between the
    # chunks' large temporaries would fragment malloc's heap and grow it by a chunk each (GBs per tensor)

    def chunk_norms(j):
        norms[j] = [torch.linalg.vector_norm(x[chunks[j]].to(dtype)).item() for x in (a, b)]

    chunking.each_chunk(chunk_norms, len(chunks))
    norm_a, norm_b = (torch.linalg.vector_norm(torch.tensor(column, dtype=dtype)) for column in zip(*norms))
    norm_a = norm_a if norm_a > 1e-8 else torch.ones((), dtype=dtype)
    norm_b = norm_b if norm_b > 1e-8 else torch.ones((), dtype=dtype)
    dots = [None] * len(chunks)

    def chunk_dot(j):
        dots[j] = torch.dot(a[chunks[j]].to(dtype) / norm_a, b[chunks[j]].to(dtype) / norm_b).item()

    chunking.each_chunk(chunk_dot, len(chunks))
    dot = torch.zeros((), dtype=dtype)
    for chunk_dot_value in dots:  # summed in ``dtype``, chunk after chunk
        dot += chunk_dot_value
    dot = dot.clamp(-1, 1)
    if dot.abs() > 0.9995:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        coef_a = (torch.sin((1 - t) * theta) / torch.sin(theta)).item()
        coef_b = (torch.sin(t * theta) / torch.sin(theta)).item()

    compiled = dtype == torch.float32 and native.supports(a.dtype, a.device, 1) and out.device == a.device

    def chunk_out(j):
        c = chunks[j]
        if compiled:
            native.weighted_sum([a[c], b[c]], [float(coef_a), float(coef_b)], out[c], fused=False)
        else:
            out[c] = torch.add(a[c].to(dtype) * coef_a, b[c].to(dtype) * coef_b)

    chunking.each_chunk(chunk_out, len(chunks))
    return out


def _nuslerp(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool) -> Tensor:
    """Slerp of each row (or of the flattened tensors), lerp where a pair is collinear."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(collinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(collinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


@register("nuslerp", model_params={"weight": REQUIRED},
          params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
          min_non_base=2, max_non_base=2)
def nuslerp(tensors, base, model_params, params, ctx):
    """Slerp with t = w₂/(w₁+w₂) between two models, or between their task vectors when there is a base."""
    others = non_base(tensors, base)
    if len(others) != 2:  # the planner refuses this first; kept so a direct call is one line too
        raise EvomergeError(f"nuslerp needs exactly 2 models besides the base, got {len(others)}")
    first, second = others
    w1, w2 = model_params[first]["weight"], model_params[second]["weight"]
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    interpolate = partial(_nuslerp, t, row_wise=params["nuslerp_row_wise"], flatten=params["nuslerp_flatten"])
    if base is None:
        return interpolate(tensors[first], tensors[second])
    origin = tensors[base]
    return origin + interpolate(tensors[first] - origin, tensors[second] - origin)


@register("multislerp", model_params={"weight": REQUIRED}, params={"normalize_weights": True, "eps": 1e-8},
          min_non_base=1)
def multislerp(tensors, base, model_params, params, ctx):
    """Barycentric slerp: average on the tangent space at the weighted mean direction, map back.

    With a base, interpolates task vectors. A single model is returned unchanged (as mergekit does).
    """
    others = non_base(tensors, base)
    if len(others) == 1:
        return tensors[others[0]]
    eps = params["eps"]
    points = torch.stack([tensors[i] for i in others])
    if base is not None:
        points -= tensors[base]
    flat = points.view(len(others), -1)
    weights = torch.tensor([model_params[i]["weight"] for i in others], dtype=points.dtype)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(others) != 2:
            raise EvomergeError(f"multislerp: {ctx.name}: the weighted directions cancel out (antipodal models "
                                "with balancing weights); change the weights")
        result = (points[0] * weights[0] + points[1] * weights[1]).view(points.shape[1:])
        return result if base is None else result + tensors[base]
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(points.shape[1:])
    return result if base is None else result + tensors[base]


@register("karcher", params={"max_iter": 10, "tol": 1e-5}, base_is_input=True)
def karcher(tensors, base, model_params, params, ctx):
    """Equal-weight Karcher (Riemannian) mean of the directions, rescaled by the mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    tol, dtype = params["tol"], float_dtype(tensors[0])
    alpha = 1.0 / len(tensors)
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [t / n if n.item() > tol else None for t, n in zip(tensors, norms)]
    valid = [u for u in units if u is not None]
    if not valid:
        return torch.zeros_like(tensors[0])
    mean = sum(u * (1 / len(valid)) for u in valid)
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(params["max_iter"]):
        tangent = torch.zeros_like(mean)
        for unit in valid:
            dot = torch.dot(mean.flatten(), unit.flatten()).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() >= tol:
                tangent += (1 / len(valid)) * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return (sum(alpha * n for n in norms) * mean).to(tensors[0].dtype)
