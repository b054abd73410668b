"""Executing a plan: each output tensor is computed from its sources and handed to a sink.

The same code path serves both uses: streaming to a sharded checkpoint on disk (``merge``) and writing
into a live model's parameters in place (``merge_into``, the search's materializer).
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from merge_core import chat_templates
from merge_core.adapters import SourceOpener
from merge_core.checkpoint import (
    ShardedWriter,
    atomic_output_dir,
    copy_tokenizer_files,
    parse_size,
)
from merge_core.errors import EvomergeError
from merge_core.memory import reuse_freed_memory
from merge_core.methods import TIE_BREAKS, TensorContext
from merge_core.moe import merge_moe
from merge_core.plan import MergePlan, Source, TensorJob, plan_merge
from merge_core.recipe import MoERecipe, Recipe, model_card
from merge_core.runtime import DTYPES, check_device, check_dtype_name, progress_bar
from merge_core.vocab import Vocabulary, build_vocabulary


class BackgroundWrites:
    """Writes tensors on one background thread while the next ones are computed (file writes release the
    GIL), with at most ``depth`` tensors waiting, so memory stays bounded. Errors surface in the caller."""

    def __init__(self, writer: ShardedWriter, depth: int = 2):
        self.writer = writer
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-writer")
        self.pending: deque = deque()
        self.depth = depth

    def __enter__(self) -> Callable[[str, torch.Tensor], None]:
        return self.submit

    def submit(self, name: str, tensor: torch.Tensor) -> None:
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self.writer.write, name, tensor))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            while self.pending:
                future = self.pending.popleft()
                if exc_type is None:
                    future.result()
                else:
                    future.cancel()
        finally:
            self.pool.shutdown(wait=True)


def open_sources(recipe: Recipe, *, allow_pickle: bool = False, recipe_dir: Path | None = None
                 ) -> dict[str, Source]:
    """Every model the recipe reads, each directory opened once: model directories as checkpoint readers,
    LoRA adapters (``BASE+ADAPTER``, or an adapter directory over the recipe's base_model) as the base
    with the adapter applied tensor by tensor (``merge_core.adapters``)."""
    opener = SourceOpener(recipe_dir, allow_pickle=allow_pickle)
    slices = recipe.input_form()[1] or []
    base = recipe.base_model or next((s.base_model for s in slices if s.base_model), None)
    return {ref: opener.open(ref, base) for ref in recipe.referenced_models()}


def _generator(seed: int | None, name: str, device: str) -> torch.Generator | None:
    """One generator per tensor, seeded from (seed, name): results do not depend on the order of work."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _all_finite(tensor: torch.Tensor) -> bool:
    """One reduction instead of an elementwise pass: a NaN or Inf entry makes the sum non-finite, so only an
    overflowing sum of finite entries needs the elementwise check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _tensor_cache(cache: dict, job: TensorJob, itemsize: int, budget: int | None) -> tuple[dict, bool]:
    """The tensor's own cache dict, and whether methods may keep whole-tensor precomputations in it (task
    vectors, plus sorted magnitudes for wider than 16-bit floats, whose histogram is too big to keep).
    First come, first served within ``budget`` bytes, decided once per tensor so every candidate takes the
    same path."""
    key = (job.name, tuple(job.models), tuple(job.tensor_names), job.base)
    if key not in cache:
        numel = 1
        for size in job.shape:
            numel *= size
        cost = (2 if itemsize > 2 else 1) * numel * itemsize * (len(job.models) - (job.base is not None))
        spent = cache.get("precomputed_bytes", 0)
        allowed = budget is None or spent + cost <= budget
        cache[key] = ({}, allowed)
        cache["precomputed_bytes"] = spent + cost * allowed
    return cache[key]


def compute_tensor(job: TensorJob, plan: MergePlan, sources: dict[str, Source], *, dtype: torch.dtype | None,
                   device: str, seed: int | None, cache: dict | None = None,
                   precompute_bytes: int | None = None, out: torch.Tensor | None = None,
                   tie_break: str = "index") -> torch.Tensor:
    """The merged value of one output tensor, in the compute dtype, checked to be finite.

    ``cache`` (one dict across calls) keeps the methods' input-only work per tensor, for searches; whole-
    tensor precomputations in it are bounded by ``precompute_bytes`` (None: unbounded). ``out``: where the
    method may write the result (the live model's parameter), unless it shares memory with an input.
    ``tie_break``: see ``TensorContext``.
    """
    tensors = [sources[m].get(n, dtype=dtype, device=device) for m, n in zip(job.models, job.tensor_names)]
    if job.permute_vocabulary:
        tensors = plan.vocabulary.align(job.models, tensors, job.base)
    tensor_cache, precompute = None, False
    if cache is not None:
        tensor_cache, precompute = _tensor_cache(cache, job, tensors[0].element_size(), precompute_bytes)
    if out is not None and any(t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for t in tensors):
        out = None
    ctx = TensorContext(name=job.name, generator=_generator(seed, job.name, device), cache=tensor_cache,
                        precompute=precompute, out=out, tie_break=tie_break)
    result = plan.method.fn(tensors, job.base, job.model_params, job.params, ctx)
    if not _all_finite(result):
        raise EvomergeError(non_finite_cause(job, plan.method.name, tensors, result))
    return result


def non_finite_cause(job: TensorJob, method: str, inputs: list[torch.Tensor], result: torch.Tensor) -> str:
    """Why a merged tensor holds NaN or Inf, as one line: a source that already does, or the arithmetic
    (values beyond the dtype's range), with the per-model weights that scaled them."""
    where = f"tensor {job.name}"
    for model, tensor in zip(job.models, inputs):
        if not _all_finite(tensor):
            return f"{where}: model {model} holds NaN or Inf values (the merge cannot repair a broken source)"
    weights = [p["weight"] for p in job.model_params if isinstance(p.get("weight"), (int, float))]
    scale = f" (weights: {', '.join(f'{w:g}' for w in weights)})" if weights else ""
    if bool(torch.isnan(result).any()):
        return f"{where}: {method} produced NaN from finite inputs{scale}"
    limit = torch.finfo(result.dtype).max if result.is_floating_point() else float("inf")
    return (f"{where}: {method} produced Inf from finite inputs: the merged values overflow {_dtype_name(result.dtype)}"
            f" (largest finite {limit:.4g}){scale}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_plan(plan: MergePlan, sources: dict[str, Source], sink: Callable[[TensorJob, torch.Tensor], None], *,
             dtype: torch.dtype | None, device: str = "cpu", seed: int | None = None,
             progress: bool = False, cache: dict | None = None, precompute_bytes: int | None = None,
             destination: Callable[[TensorJob], torch.Tensor | None] = lambda job: None,
             tie_break: str = "index") -> None:
    """Compute every job and hand it to ``sink``; ``destination(job)``, if it gives a tensor, is where the
    method may write the result directly (see ``compute_tensor``)."""
    def compute(job):
        return compute_tensor(job, plan, sources, dtype=dtype, device=device, seed=seed, cache=cache,
                              precompute_bytes=precompute_bytes, out=destination(job), tie_break=tie_break)

    if not progress:
        for job in plan.jobs:
            sink(job, compute(job))
        return
    with progress_bar("merging", "tensor", transient=True) as bar:
        task = bar.add_task("merge", total=len(plan.jobs), tensor="")
        for job in plan.jobs:
            bar.update(task, tensor=job.name)
            sink(job, compute(job))
            bar.advance(task)


def _dtypes(recipe: Recipe, dtype: str | None) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(compute dtype, output dtype): ``--dtype`` overrides both; ``out_dtype`` defaults to ``dtype``."""
    if dtype is not None:
        check_dtype_name(dtype, "--dtype")
    compute = DTYPES.get(dtype or recipe.dtype or "")
    out = DTYPES.get(dtype or recipe.out_dtype or recipe.dtype or "")
    return compute, out


def _tokenizer_dir(recipe: Recipe, paths: dict[str, Path], template: str) -> Path:
    """Where the tokenizer is copied from when the recipe merges none (see ``merge_core.vocab``)."""
    return paths[recipe.base_model or template]


def _chat_template(recipe: Recipe, paths: dict[str, Path]) -> str | None:
    name = recipe.chat_template
    if not name:
        return None
    if name == "auto":
        found = []
        for p in paths.values():
            cfg = p / "tokenizer_config.json"
            template = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
            if (p / "chat_template.jinja").is_file():
                template = (p / "chat_template.jinja").read_text()
            if isinstance(template, str):
                found.append(template)
        return Counter(found).most_common(1)[0][0] if found else None
    if name in chat_templates.BUILTIN:
        return chat_templates.BUILTIN[name]
    if "{" not in name:
        raise EvomergeError(f"chat_template: unknown template {name!r} "
                            f"(use auto, {', '.join(chat_templates.BUILTIN)} or a Jinja template)")
    return name


def write_tokenizer(out: Path, recipe: Recipe, paths: dict[str, Path], template: str,
                    vocabulary: Vocabulary | None = None) -> None:
    if vocabulary is not None:
        vocabulary.tokenizer.save_pretrained(out)
    else:
        copy_tokenizer_files(_tokenizer_dir(recipe, paths, template), out)
    chat = _chat_template(recipe, paths)
    if chat is not None:
        (out / "chat_template.jinja").write_text(chat)
        cfg_path = out / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        cfg["chat_template"] = chat
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def output_config(plan: MergePlan, out_dtype: torch.dtype | None) -> dict[str, Any]:
    config = dict(plan.config)
    if out_dtype is not None:
        name = str(out_dtype).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = name
    return config


def merge(recipe: Recipe, out_dir: str | Path, *, device: str = "cpu", dtype: str | None = None,
          out_shard_size: str | int = "5GB", seed: int | None = None, copy_tokenizer: bool = True,
          force: bool = False, allow_pickle: bool = False, progress: bool = False,
          recipe_dir: str | Path | None = None, tie_break: str = "index") -> Path:
    """Merge ``recipe`` into a Hugging Face checkpoint at ``out_dir``, atomically. ``tie_break``: which
    magnitudes tied at a sparsification threshold are kept (see ``TensorContext``)."""
    if isinstance(recipe, MoERecipe):
        return merge_moe(recipe, out_dir, device=device, dtype=dtype, out_shard_size=out_shard_size, seed=seed,
                         copy_tokenizer=copy_tokenizer, force=force, allow_pickle=allow_pickle,
                         recipe_dir=Path(recipe_dir) if recipe_dir else None)
    check_device(device)
    if tie_break not in TIE_BREAKS:
        raise EvomergeError(f"tie_break: use one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
    reuse_freed_memory()
    compute_dtype, out_dtype = _dtypes(recipe, dtype)
    max_shard = parse_size(out_shard_size)
    out_dir = Path(out_dir)
    recipe_dir = Path(recipe_dir) if recipe_dir else None
    if seed is None and recipe.evomerge is not None:
        seed = recipe.evomerge.seed
    if seed is None and recipe_stochastic(recipe):
        seed = int.from_bytes(os.urandom(4), "little")
    with atomic_output_dir(out_dir, force=force) as tmp:
        sources = open_sources(recipe, allow_pickle=allow_pickle, recipe_dir=recipe_dir)
        paths = {ref: s.path for ref, s in sources.items()}
        vocabulary = build_vocabulary(recipe, paths, {ref: s.config for ref, s in sources.items()})
        plan = plan_merge(recipe, sources, vocabulary)
        layout = {job.name: (job.shape, out_dtype or sources[job.models[0]].dtype(job.tensor_names[0]))
                  for job in plan.jobs}
        writer = ShardedWriter(tmp, layout, max_shard_bytes=max_shard)
        def to_output(job: TensorJob, tensor: torch.Tensor) -> None:
            stored = tensor.to(device="cpu", dtype=layout[job.name][1])
            if stored.dtype != tensor.dtype and stored.is_floating_point() and not _all_finite(stored):
                raise EvomergeError(f"tensor {job.name}: the merged values overflow the output dtype "
                                    f"{_dtype_name(stored.dtype)} (largest finite "
                                    f"{torch.finfo(stored.dtype).max:.4g}); use a wider out_dtype")
            to_disk(job.name, stored)

        with BackgroundWrites(writer) as to_disk:
            run_plan(plan, sources, to_output, dtype=compute_dtype, device=device, seed=seed, progress=progress,
                     tie_break=tie_break,
                     destination=(lambda job: writer.destination(job.name)) if device == "cpu" else lambda job: None)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(output_config(plan, out_dtype), indent=2))
        template_dir = sources[plan.template_model].path
        if (template_dir / "generation_config.json").is_file():
            shutil.copy2(template_dir / "generation_config.json", tmp / "generation_config.json")
        if copy_tokenizer or vocabulary is not None:  # a merged vocabulary is part of the model
            write_tokenizer(tmp, recipe, paths, plan.template_model, vocabulary)
        (tmp / "mergekit_config.yml").write_text(recipe.to_yaml())
        (tmp / "README.md").write_text(model_card(recipe, seed))
    return out_dir


def recipe_stochastic(recipe: Recipe) -> bool:
    from merge_core.methods import get_method

    return get_method(recipe.merge_method).stochastic


def merge_into(model: torch.nn.Module, recipe: Recipe, sources: dict[str, Source], *, dtype: str | None = None,
               device: str = "cpu", seed: int | None = None, cache: dict | None = None,
               precompute_bytes: int | None = None) -> MergePlan:
    """Materialize ``recipe`` into ``model``'s parameters in place (no checkpoint is written).

    Pass the same ``cache`` dict for every candidate merged from the same sources (a search);
    ``precompute_bytes`` bounds its whole-tensor precomputations (None: unbounded).
    """
    reuse_freed_memory()
    compute_dtype, _ = _dtypes(recipe, dtype)
    plan = plan_merge(recipe, sources)
    state = model.state_dict()
    missing = [job.name for job in plan.jobs if job.name not in state]
    if missing:
        raise EvomergeError(f"the live model has no parameter {missing[0]}")

    def into_model(job: TensorJob, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            state[job.name].copy_(tensor)  # nothing to do when the method wrote there itself

    run_plan(plan, sources, into_model, dtype=compute_dtype, device=device, seed=seed, cache=cache,
             precompute_bytes=precompute_bytes, destination=lambda job: state[job.name].data)
    return plan
