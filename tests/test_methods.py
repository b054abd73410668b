"""Merge methods: parity with mergekit 0.1.5's own kernels, stochastic behaviour, hand-computed cases."""

import pytest
import torch
from mergekit.merge_methods import TensorGroup
from mergekit.merge_methods.api import merge_tensors
from mergekit.merge_methods.generalized_task_arithmetic import ConsensusMethod, GeneralizedTaskArithmeticMerge
from mergekit.merge_methods.registry import registered_methods
from mergekit.sparsify import SparsificationMethod, sparsify

from merge_core import methods, native
from merge_core.errors import EvomergeError
from merge_core.methods import METHODS, TensorContext, check_inputs, chunking, get_method, interpolation, selection
from merge_core.methods.sparsify import Sparsification
from merge_core.methods.task_arithmetic import Consensus, combine, task_arithmetic

SHAPES = [(64, 48), (96,), (300, 16)]  # weight, bias/norm, embedding-like (tall, narrow)

TWO = [{"weight": 0.7, "density": 0.3}, {"weight": 0.4, "density": 0.6}]
FOUR = TWO + [{"weight": -0.2, "density": 0.5}, {"weight": 0.3, "density": 0.2}]

# (method, base index or None, per-model parameters of the non-base models, global parameters)
CASES = [
    ("linear", None, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}], {}),
    ("linear", None, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}], {"normalize": False}),
    ("slerp", 0, [{}], {"t": 0.3}),
    ("slerp", 1, [{}], {"t": 0.7}),
    ("nuslerp", None, [{"weight": 0.3}, {"weight": 0.7}], {}),
    ("nuslerp", 0, [{"weight": 0.3}, {"weight": 0.7}], {"nuslerp_flatten": False}),
    ("nuslerp", 0, [{"weight": 0.4}, {"weight": 0.6}], {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", None, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}], {}),
    ("multislerp", 0, [{"weight": 0.5}, {"weight": 0.3}], {}),
    ("karcher", None, [{}, {}, {}], {}),
    ("task_arithmetic", 0, [{"weight": 0.7}, {"weight": 0.4}], {}),
    ("task_arithmetic", 0, [{"weight": 0.7}, {"weight": 0.4}, {"weight": 0.2}], {"normalize": True, "lambda": 1.3}),
    ("ties", 0, TWO, {}),
    ("ties", 0, FOUR, {"rescale": True, "normalize": False}),
    ("dare_ties", 0, TWO, {}),
    ("dare_ties", 0, FOUR, {"normalize": True, "lambda": 0.8}),
    ("dare_linear", 0, FOUR, {}),
    ("breadcrumbs", 0, [{"weight": 0.7, "density": 0.3}, {"weight": 0.4, "density": 0.8, "gamma": 0.05}], {}),
    ("breadcrumbs_ties", 0, TWO, {"rescale": True}),
    ("della", 0, [{"weight": 0.7, "density": 0.3}, {"weight": 0.4, "density": 0.6, "epsilon": 0.1}], {}),
    ("della_linear", 0, [{"weight": 0.7, "density": 0.4}, {"weight": 0.4, "density": 0.6}], {}),
    ("sce", 0, [{}, {}], {}),
    ("sce", 0, [{}, {}, {}], {"select_topk": 0.3}),
    ("ram", 0, [{}, {}], {"epsilon": 0.03}),
    ("ramplus_tl", 0, [{}, {}, {}], {"epsilon": 0.03}),
    ("model_stock", 0, [{}, {}], {}),
    ("model_stock", 0, [{}, {}, {}], {"filter_wise": True}),
    ("nearswap", 0, [{}], {"t": 0.04}),
    ("arcee_fusion", 0, [{}], {}),
    ("passthrough", None, [{"scale": 0.5}], {}),
    ("passthrough", None, [{}], {}),
]


# DARE draws its own random stream (cheaper than mergekit's), so its results are checked statistically
PARITY_CASES = [c for c in CASES if not c[0].startswith("dare")]


def models(shape, count, dtype=torch.float32, seed=1):
    """A base and ``count - 1`` fine-tunes near it (task vectors ~5% of the weights)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base.to(dtype)] + [(base + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(count - 1)]


def run_ours(name, tensors, base, per_model, params, seed=0, cache=None, precompute=False):
    method = METHODS[name]
    supplied = iter(per_model)
    model_params = [{**method.model_params, **next(supplied, {})} if method.base_is_input or i != base else {}
                    for i in range(len(tensors))]
    ctx = TensorContext("t", generator=torch.Generator().manual_seed(seed), cache=cache, precompute=precompute)
    return method.fn(tensors, base, model_params, {**method.params, **params}, ctx)


def run_mergekit(name, tensors, base, per_model, params, seed=0):
    defaults = METHODS[name].model_params
    per_model = [{**defaults, **p} for p in per_model]
    parameters = dict(params)
    for key in defaults:
        parameters[key] = [p[key] for p in per_model]
    torch.manual_seed(seed)  # mergekit draws from the global generator
    return merge_tensors(tensors, name, parameters=parameters, base_index=base)


def inputs_for(base, per_model, shape, dtype=torch.float32):
    return models(shape, len(per_model) + (base is not None), dtype)


def test_registry_matches_mergekit_names():
    assert set(METHODS) == {m.spec.name for m in registered_methods()}


def test_parameters_and_defaults_match_mergekit():
    for spec in (m.spec for m in registered_methods()):
        ours = METHODS[spec.name]
        for p in spec.parameters:
            where = ours.params if p.scope == "shared" else ours.model_params
            assert p.name in where, (spec.name, p.name)
            if not p.required:
                assert where[p.name] == p.default, (spec.name, p.name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name,base,per_model,params", PARITY_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_float32_result_matches_mergekit(name, base, per_model, params, shape):
    tensors = inputs_for(base, per_model, shape)
    ours = run_ours(name, tensors, base, per_model, params)
    theirs = run_mergekit(name, tensors, base, per_model, params)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name,base,per_model,params",
                         [c for c in PARITY_CASES if c[0] not in ("ties", "breadcrumbs", "breadcrumbs_ties")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_bfloat16_result_is_bitwise_mergekit(name, base, per_model, params):
    """Methods compute in the compute dtype and round where mergekit rounds."""
    tensors = inputs_for(base, per_model, (300, 16), torch.bfloat16)
    ours = run_ours(name, tensors, base, per_model, params)
    theirs = run_mergekit(name, tensors, base, per_model, params)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)


def test_count_consensus_matches_mergekit():
    method = GeneralizedTaskArithmeticMerge(ConsensusMethod.count, SparsificationMethod.magnitude, True, False,
                                            "ties_count", None, None)
    tensors = models((64, 48), 4)
    theirs, = method([TensorGroup.from_tensors(tensors, base_index=0)],
                     parameters={"weight": [0.5, 0.3, 0.2], "density": [0.4, 0.5, 0.6]})
    ours = task_arithmetic(tensors, 0, [{}, *({"weight": w, "density": d} for w, d in
                                      [(0.5, 0.4), (0.3, 0.5), (0.2, 0.6)])],
                           {"normalize": True, "rescale": False, "lambda": 1.0}, TensorContext("t"),
                           sparsification=Sparsification.MAGNITUDE, consensus=Consensus.COUNT)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_ties_differs_from_mergekit_only_at_threshold_ties(dtype):
    """Many 16-bit magnitudes equal the threshold; mergekit's argsort keeps an arbitrary subset of
    them, we keep the lowest indices. The count and every other entry agree."""
    base, model = models((300, 16), 2, dtype)
    delta = model - base
    theirs = sparsify(delta, density=0.3, method=SparsificationMethod.magnitude) != 0
    ours = run_ours("ties", [base, model], 0, [{"weight": 1.0, "density": 0.3}], {}) != base
    assert ours.sum() == theirs.sum() == max(1, int(0.3 * delta.numel()))
    differing = delta.abs()[ours != theirs]
    threshold = delta.abs()[ours].min()
    assert (differing == threshold).all()


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.7, 0.97])
def test_threshold_ties_kept_are_the_lowest_indices_across_chunks(monkeypatch, density):
    """Eight magnitudes only, so most of the threshold's ties are dropped; the kept ones are the first in
    index order, whichever end of the tensor the tie search starts from."""
    monkeypatch.setattr(chunking, "CHUNK", 997)
    generator = torch.Generator().manual_seed(5)
    magnitudes = torch.randint(1, 9, (200, 173), generator=generator)
    signs = torch.randint(0, 2, (200, 173), generator=generator) * 2 - 1
    model = (magnitudes * signs).to(torch.bfloat16) / 8
    base = torch.zeros_like(model)
    kept = (run_ours("ties", [base, model], 0, [{"weight": 1.0, "density": density}], {}) != 0).view(-1)
    k = int(density * model.numel())
    threshold = magnitudes.view(-1).sort(descending=True).values[k - 1]
    ties = kept[(magnitudes.view(-1) == threshold).nonzero().view(-1)]
    assert kept.sum() == k
    assert (magnitudes.view(-1)[kept] >= threshold).all()
    assert ties[:int(ties.sum())].all() and 0 < ties.sum() < len(ties)


def test_threshold_selection_agrees_with_sort_for_every_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        model = models((1000, 30), 1, dtype, seed=3)[0]
        base = torch.zeros_like(model)  # the merge is then exactly the kept entries
        for density in (1e-4, 0.1, 0.5, 0.999):
            ours = run_ours("ties", [base, model], 0, [{"weight": 1.0, "density": density}], {}) != 0
            k = max(1, int(density * base.numel()))
            magnitudes = model.abs().reshape(-1).double()
            assert ours.sum() == k
            assert magnitudes[ours.reshape(-1)].min() >= magnitudes.sort(descending=True).values[k - 1]


def test_tensor_spanning_many_chunks_matches_mergekit(monkeypatch):
    monkeypatch.setattr(chunking, "CHUNK", 1000)
    tensors = models((130, 70), 3)
    for name, per_model in [("ties", TWO), ("breadcrumbs_ties", TWO),
                            ("della", [{"weight": 0.5, "density": 0.5}] * 2)]:
        ours = run_ours(name, tensors, 0, per_model, {"rescale": True})
        theirs = run_mergekit(name, tensors, 0, per_model, {"rescale": True})
        assert (ours - theirs).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion"])
def test_same_seed_gives_identical_bytes(name):
    tensors = models((1100, 1000) if name == "arcee_fusion" else (300, 200), 2)  # arcee samples above 1M
    per_model = [{"weight": 0.6, "density": 0.4}] if METHODS[name].model_params else [{}]
    first = run_ours(name, tensors, 0, per_model, {}, seed=7)
    assert torch.equal(first, run_ours(name, tensors, 0, per_model, {}, seed=7))
    if name != "arcee_fusion":
        assert not torch.equal(first, run_ours(name, tensors, 0, per_model, {}, seed=8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della_linear"])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_kept_fraction_is_density(name, density, dtype):
    base, model = models((600, 500), 2, dtype)
    if name == "della_linear" and (density in (0.05, 0.9) or dtype != torch.float32):
        pytest.skip("della needs density ± epsilon inside (0, 1); its bf16 probabilities round as mergekit's")
    merged = run_ours(name, [base, model], 0, [{"weight": 1.0, "density": density}], {"rescale": False})
    kept = (merged != base).float().mean().item()
    changed = (model != base).float().mean().item()  # bf16 rounding leaves some entries unchanged
    assert abs(kept - density * changed) <= 0.01 * density * changed


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_rescaled_random_sparsification_keeps_expected_delta(name, density):
    base, model = models((50, 40), 2)
    draws = [run_ours(name, [base, model], 0, [{"weight": 1.0, "density": density}], {}, seed=s) - base
             for s in range(400)]
    mean = torch.stack(draws).mean(0)
    delta = model - base
    assert (mean - delta).abs().mean() < 0.1 * delta.abs().mean()
    assert (mean - delta).mean().abs() < 0.01 * delta.abs().mean()  # no bias


def test_dare_at_density_one_is_task_arithmetic_and_ties():
    tensors = models((64, 48), 3)
    dense = [{"weight": 0.7, "density": 1.0}, {"weight": 0.4, "density": 1.0}]
    assert torch.equal(run_ours("dare_linear", tensors, 0, dense, {}),
                       run_ours("task_arithmetic", tensors, 0, dense, {}))
    assert torch.equal(run_ours("dare_ties", tensors, 0, dense, {}),
                       run_ours("ties", tensors, 0, dense, {"normalize": False}))


@pytest.mark.parametrize("precompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,params", [("ties", {}), ("breadcrumbs_ties", {}), ("ties", {"rescale": True}),
                                         ("task_arithmetic", {}), ("dare_ties", {})])
def test_cache_reuse_across_densities_gives_same_result(monkeypatch, name, params, dtype, precompute):
    """Cached histograms, task vectors and sorted magnitude keys give the uncached bytes, ties at the
    threshold included (bf16 has many magnitudes equal to it)."""
    monkeypatch.setattr(chunking, "CHUNK", 1000)
    tensors = models((70, 50), 3, dtype)
    cache = {}
    for density in (0.2, 0.5, 0.9, 0.5):
        per_model = [{"weight": 0.5, "density": density}, {"weight": 0.8, "density": 1.2 - density}]
        assert torch.equal(run_ours(name, tensors, 0, per_model, params, cache=cache, precompute=precompute),
                           run_ours(name, tensors, 0, per_model, params))
    assert bool(cache) == (name != "dare_ties" and (precompute or name != "task_arithmetic"))


@pytest.mark.parametrize("name,params", [("ties", {}), ("task_arithmetic", {"normalize": True}),
                                         ("breadcrumbs_ties", {"rescale": True}), ("dare_linear", {})])
def test_tensor_no_fine_tune_changed_is_the_base_cached_or_not(name, params):
    """A tensor frozen in every fine-tune (LoRA leaves embeddings and norms alone) merges to the base
    (-0.0 becomes +0.0, as base + 0 does), with the search cache's shortcut and without it."""
    base = models((40, 30), 1, torch.bfloat16)[0]
    base[0, 0] = -0.0
    per_model = [{"weight": 0.7, "density": 0.4}, {"weight": 0.2, "density": 0.6}]
    cache = {}
    cached = run_ours(name, [base, base.clone(), base.clone()], 0, per_model, params, cache=cache, precompute=True)
    uncached = run_ours(name, [base, base.clone(), base.clone()], 0, per_model, params)
    assert torch.equal(cached, base) and torch.equal(uncached, base)
    assert cached.view(torch.int16).equal(uncached.view(torch.int16))
    assert str(cached[0, 0].item()) == "0.0"


def test_linear_weights_one_zero_returns_first_model():
    a, b = models((8, 4), 2)
    assert torch.equal(run_ours("linear", [a, b], None, [{"weight": 1.0}, {"weight": 0.0}], {}), a)


def test_slerp_endpoints():
    a, b = models((8, 4), 2)
    assert torch.allclose(run_ours("slerp", [a, b], 0, [{}], {"t": 0.0}), a, atol=1e-6)
    assert torch.allclose(run_ours("slerp", [a, b], 0, [{}], {"t": 1.0}), b, atol=1e-6)
    assert torch.allclose(run_ours("slerp", [a, b], 1, [{}], {"t": 0.0}), b, atol=1e-6)


def test_slerp_without_base_starts_from_first_model():
    a, b = models((8, 4), 2)
    assert torch.equal(run_ours("slerp", [a, b], None, [{}], {"t": 0.25}),
                       run_ours("slerp", [a, b], 0, [{}], {"t": 0.25}))


def test_task_arithmetic_is_base_plus_weighted_deltas():
    base, a, b = models((8, 4), 3)
    merged = run_ours("task_arithmetic", [base, a, b], 0, [{"weight": 0.5}, {"weight": -0.25}], {})
    assert torch.allclose(merged, base + 0.5 * (a - base) - 0.25 * (b - base), atol=1e-6)


def test_passthrough_scales():
    a, = models((8, 4), 1)
    assert torch.equal(run_ours("passthrough", [a], None, [{"scale": 2.0}], {}), a * 2)
    assert torch.equal(run_ours("passthrough", [a], None, [{}], {}), a)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval_is_refused(density):
    tensors = models((8, 4), 2)
    with pytest.raises(EvomergeError, match=f"density.*{density}"):
        run_ours("ties", tensors, 0, [{"weight": 1.0, "density": density}], {})
    with pytest.raises(EvomergeError, match="density"):
        METHODS["dare_ties"].check([{}, {"weight": 1.0, "density": density}], {})


def test_della_refuses_epsilon_reaching_outside_unit_interval():
    with pytest.raises(EvomergeError, match="epsilon"):
        METHODS["della"].check([{"weight": 1.0, "density": 0.1, "epsilon": 0.15}], {})


@pytest.mark.parametrize("name,count,has_base,message", [
    ("slerp", 3, True, "slerp needs exactly 2 models"),
    ("nearswap", 2, False, "needs a base_model"),
    ("nuslerp", 2, True, "exactly 2 models besides the base"),
    ("model_stock", 2, True, "at least 3 models"),
    ("passthrough", 2, False, "exactly|1 models"),
])
def test_model_count_errors_are_one_line(name, count, has_base, message):
    with pytest.raises(EvomergeError, match=message):
        check_inputs(get_method(name), count, has_base)


def test_valid_model_counts_pass():
    check_inputs(get_method("slerp"), 2, False)
    check_inputs(get_method("nuslerp"), 3, True)
    check_inputs(get_method("linear"), 3, True)
    check_inputs(get_method("ties"), 1, True)


class _ShapesOnly:
    """A two-layer model that planning can read: names, shapes and a config, no tensor data."""

    def __init__(self):
        self.config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2,
                       "vocab_size": 8, "hidden_size": 4}
        self.names = ["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.layers.1.mlp.weight",
                      "lm_head.weight"]

    def shape(self, name):
        return (8, 4) if "embed" in name or "lm_head" in name else (4, 4)

    def dtype(self, name):
        return torch.float32


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_planner_enforces_each_methods_input_limits_exactly(name):
    """Every method, with and without a base, 1 to 4 other models: the planner refuses a recipe exactly
    when the method's limits (check_inputs) do, with the same message."""
    from merge_core.plan import FIRST_MODEL_IS_BASE, plan_merge
    from merge_core.recipe import load_recipe

    method = get_method(name)
    global_params = {p: 0.5 for p, d in method.params.items() if d is methods.REQUIRED}
    sources = {m: _ShapesOnly() for m in ["base", "m1", "m2", "m3", "m4"]}
    for has_base in (True, False):
        for others in range(1, 5):
            weight = {"weight": 1.0} if "weight" in method.model_params else {}
            models = [{"model": f"m{i}", "parameters": weight} for i in range(1, others + 1)]
            recipe = load_recipe({"merge_method": name, "models": models, "parameters": global_params,
                                  **({"base_model": "base"} if has_base else {})})
            based = has_base or name in FIRST_MODEL_IS_BASE
            try:
                check_inputs(method, others + has_base, based, "slices[0]")
                expected = None
            except EvomergeError as exc:
                expected = str(exc)
            try:
                plan_merge(recipe, sources)
                got = None
            except EvomergeError as exc:
                got = str(exc)
            assert got == expected, (has_base, others)


@pytest.mark.parametrize("rows", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sign_bit_election_equals_mergekit_formula(dtype, rows):
    """Zeros of either sign, exact cancellations and ties included."""
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(rows, 4000, generator=g).to(dtype)
    deltas[:, :500] = 0
    deltas[0, 500:1000] = -0.0
    deltas[1, 1000:1500] = -deltas[0, 1000:1500]
    deltas[:, 1500:2000] *= torch.randint(0, 2, (rows, 500), generator=g).to(dtype)
    majority = torch.where(deltas.sum(0) >= 0, 1, -1).to(dtype)  # mergekit's get_mask(method="sum")
    expected = (deltas * (deltas.sign() == majority)).sum(0)
    ours = combine(deltas.clone(), torch.ones(rows, 1, dtype=dtype), Consensus.SUM, {"normalize": False, "lambda": 1})
    assert torch.equal(ours.view(selection.KEY_DTYPES[ours.element_size()]),
                       expected.view(selection.KEY_DTYPES[ours.element_size()]))


COMPILED_CASES = [c for c in CASES if c[0] in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                               "breadcrumbs_ties")] + [
    ("ties", 0, [{"weight": 0.0, "density": 0.5}, {"weight": -0.4, "density": 0.7}], {}),  # no clamp: 0 → 1
    ("task_arithmetic", 0, [{"weight": 0.5}, {"weight": -0.5}], {"normalize": True}),  # weights sum to 0
    ("dare_ties", 0, [{"weight": 0.6, "density": 0.5}], {"rescale": False}),
]


@pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch code is the only path")
@pytest.mark.parametrize("cached", [False, True], ids=["merge", "search-cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,base,per_model,params", COMPILED_CASES)
def test_compiled_kernel_gives_the_torch_bytes(monkeypatch, name, base, per_model, params, dtype, cached):
    """The compiled chunk kernel rounds and draws as the torch code: identical bytes, -0 and ties included,
    across chunk and block boundaries (chunks of 1000 entries, blocks of 256)."""
    monkeypatch.setattr(chunking, "CHUNK", 1000)
    tensors = models((70, 50), len(per_model) + 1, dtype, seed=3)
    tensors[1].view(-1)[::9] = tensors[0].view(-1)[::9]  # unchanged entries: ±0 deltas
    calls = []
    kernel = native.task_arithmetic
    monkeypatch.setattr(native, "task_arithmetic", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    compiled = run_ours(name, tensors, base, per_model, params, seed=5, cache={} if cached else None,
                        precompute=cached)
    assert calls, "the compiled kernel was not used"
    monkeypatch.setattr(native, "supports", lambda *a: False)
    plain = run_ours(name, tensors, base, per_model, params, seed=5, cache={} if cached else None, precompute=cached)
    assert torch.equal(compiled.view(-1).view(torch.uint8), plain.view(-1).view(torch.uint8))


def test_compiled_kernel_builds_into_the_cache_once_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        if native.library() is None:
            pytest.skip("no C compiler")
        built = list((tmp_path / "evomerge").glob("native-*.so"))
        assert len(built) == 1
        native.library.cache_clear()
        assert native.library() is not None and list((tmp_path / "evomerge").glob("native-*.so")) == built
        monkeypatch.setattr(native, "CPU_FLAGS", (["-mno-such-cpu-flag"], []))  # a compiler that cannot target it
        native.library.cache_clear()
        assert native.library() is not None and len(list((tmp_path / "evomerge").glob("native-*.so"))) == 2
        monkeypatch.setenv("CC", "false")  # a compiler that fails: merges go on with torch, with a warning
        native.library.cache_clear()
        with pytest.warns(RuntimeWarning, match="could not build its merge kernels with false"):
            assert native.library() is None
        monkeypatch.setenv("EVOMERGE_NATIVE", "0")
        native.library.cache_clear()
        assert native.library() is None
        assert not native.supports(torch.bfloat16, torch.device("cpu"), 3)
    finally:
        native.library.cache_clear()


@pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch code is the only path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,per_model,params", [
    ("slerp", [{}], {"t": 0.3}),
    ("slerp", [{}], {"t": 0.0}),
    ("linear", [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}], {}),
    ("linear", [{"weight": 0.7}, {"weight": -0.4}, {"weight": 0.0}], {"normalize": False}),
])
def test_compiled_weighted_sums_give_the_torch_bytes(monkeypatch, name, per_model, params, dtype):
    """Linear (mergekit's fused multiply-adds into zeros) and slerp's last pass (rounded products)."""
    monkeypatch.setattr(chunking, "CHUNK", 1000)
    monkeypatch.setattr(interpolation, "SLERP_CHUNK", 1000)
    tensors = models((70, 50), len(per_model) + (name == "slerp"), dtype, seed=4)
    tensors[1].view(-1)[::7] = -0.0
    calls = []
    kernel = native.weighted_sum
    monkeypatch.setattr(native, "weighted_sum", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    base = 0 if name == "slerp" else None
    compiled = run_ours(name, tensors, base, per_model, params)
    assert calls, "the compiled kernel was not used"
    monkeypatch.setattr(native, "supports", lambda *args: False)
    plain = run_ours(name, tensors, base, per_model, params)
    assert torch.equal(compiled.view(-1).view(torch.uint8), plain.view(-1).view(torch.uint8))


@pytest.mark.skipif(native.library() is None, reason="no C compiler: the torch code is the only path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_magnitude_histogram_counts_as_bincount(dtype):
    base, model = models((300, 70), 2, dtype, seed=6)
    model.view(-1)[::5] = base.view(-1)[::5]  # ±0 deltas land in bin 0
    delta = model - base
    expected = selection.key_counts(methods.magnitude_keys(delta))
    assert torch.equal(native.magnitude_histogram(base.view(-1), model.view(-1)), expected)
    assert torch.equal(native.magnitude_histogram(None, delta.view(-1)), expected)
    assert int(expected.sum()) == delta.numel() and int(expected[0]) >= delta.numel() // 5
