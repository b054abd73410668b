"""Merge methods: each one a small pure function over the tensors of one output weight.

A method is registered by name with its per-model parameters (``weight``, ``density``…) and its global
parameters (``normalize``, ``t``…), each with its default (``REQUIRED`` when the recipe must give it).
Names, parameters, defaults and arithmetic follow mergekit 0.1.5 so its recipes run unchanged and give
the same numbers.

Calling convention (``MergeMethod.fn``)::

    fn(tensors, base, model_params, params, ctx) -> Tensor

- ``tensors``: one tensor per input model, in recipe order, all in the compute dtype; the base model's
  tensor is included (at index ``base``) whenever the recipe has a base model.
- ``base``: index of the base model in ``tensors``, or None.
- ``model_params``: one dict of resolved per-model parameters per entry of ``tensors``. The base's dict
  is not read unless the method has ``base_is_input`` (mergekit resolves per-model parameters for the
  base only for those methods), so it may be empty.
- ``params``: resolved global parameters.
- ``ctx``: the output tensor's name, a seeded ``torch.Generator`` for stochastic methods, and an
  optional ``cache`` dict for work that a search can reuse across calls on the same inputs.

Dtypes, as in mergekit: the inputs arrive in the compute dtype and the result comes back in that same
dtype. Methods that mergekit runs in float32 (linear, slerp, the norms of karcher) up-cast internally
(float64 stays float64) and round once at the end; all others compute in the given dtype, rounding where
mergekit rounds, so bf16 inputs give mergekit's bf16 arithmetic.

Layout: ``registry`` (what a method is, the registry and the helpers all share), ``chunking`` (streaming
over chunks on two threads), ``interpolation`` (linear, slerp, nuslerp, multislerp, karcher),
``task_arithmetic`` (task_arithmetic, ties, dare_*, breadcrumbs*, della*: TIES election and the compiled
kernel's glue) with its ``sparsify`` (random and DELLA masks, rescaling) and ``selection`` (magnitude
thresholds by radix selection), ``base_relative`` (sce, ram, ramplus_tl, model_stock, nearswap,
arcee_fusion) and ``passthrough``. Importing this package imports them all, which registers every method.
"""

# imported for their @register side effect: every method is in METHODS once this package is imported
from merge_core.methods import base_relative, interpolation, passthrough, task_arithmetic  # noqa: F401
from merge_core.methods.registry import (
    METHODS,
    REQUIRED,
    TIE_BREAKS,
    MergeMethod,
    TensorContext,
    check_inputs,
    get_method,
)
from merge_core.methods.selection import magnitude_keys

__all__ = ["METHODS", "REQUIRED", "TIE_BREAKS", "MergeMethod", "TensorContext", "check_inputs", "get_method",
           "magnitude_keys"]
