"""passthrough: one model's tensor copied through (mergekit's way to stack or drop layers), optionally scaled."""

from __future__ import annotations

from merge_core.methods.registry import register


@register("passthrough", model_params={"scale": None}, max_models=1, base_is_input=True)
def passthrough(tensors, base, model_params, params, ctx):
    """Copy the single input, optionally multiplied by its ``scale``."""
    scale = model_params[0].get("scale")
    return tensors[0] if scale is None else tensors[0] * scale
