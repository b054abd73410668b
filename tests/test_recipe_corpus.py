"""Recipes in the shapes people publish (mergekit's README and examples, model cards of merged models),
written for a small local family: what mergekit merges, evomerge merges to the same tensors, naming in a
warning each key mergekit silently ignores; ``strict`` makes those warnings errors.

Each case: the recipe, the key paths evomerge warns about, and whether its result is deterministic (then
compared with mergekit's). Layer ranges are rescaled to the family's 4 layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from merge_core import EvomergeError, load_recipe, merge
from tests.families import make_family
from tests.test_merge_vs_mergekit import _ulps, load_weights, run_mergekit

pytest.importorskip("mergekit")


@dataclass(frozen=True)
class Case:
    recipe: dict
    warned: tuple[str, ...] = ()  # key paths named by a warning, in order
    deterministic: bool = True
    seed: int | None = None
    float32_in_mergekit: bool = False  # mergekit writes float32 whatever the recipe's dtype; evomerge rounds


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return {k: str(v) for k, v in make_family(tmp_path_factory.mktemp("corpus"), "llama").items()}


def corpus(f: dict[str, str]) -> dict[str, Case]:
    base, a, b, c = f["base"], f["ft1"], f["ft2"], f["ft3"]

    def pair(start=0, end=4):
        return [{"model": a, "layer_range": [start, end]}, {"model": b, "layer_range": [start, end]}]

    return {
        # The slerp of countless model cards: slices over two models, t gradients per filter, bf16.
        "slerp_card": Case({
            "slices": [{"sources": pair()}], "merge_method": "slerp", "base_model": a,
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
            "dtype": "bfloat16"}),
        # mergekit's README TIES example: density and weight gradients, a filtered weight, fp16.
        "ties_readme": Case({
            "models": [{"model": a, "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                       {"model": b, "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                       {"model": c, "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                                                 {"value": 0}]}}],
            "merge_method": "ties", "base_model": base, "parameters": {"normalize": True, "int8_mask": True},
            "dtype": "float16"}),
        # The base listed among the models without parameters, as cards often do.
        "ties_base_listed": Case({
            "models": [{"model": base}, {"model": a, "parameters": {"density": 0.5, "weight": 0.5}},
                       {"model": b, "parameters": {"density": 0.5, "weight": 0.5}}],
            "merge_method": "ties", "base_model": base, "parameters": {"normalize": 1.0}, "dtype": "bfloat16"},
            warned=("parameters.normalize",)),
        "dare_ties_card": Case({
            "models": [{"model": base}, {"model": a, "parameters": {"density": 0.53, "weight": 0.4}},
                       {"model": b, "parameters": {"density": 0.53, "weight": 0.3}}],
            "merge_method": "dare_ties", "base_model": base, "parameters": {"int8_mask": True},
            "dtype": "bfloat16"}, deterministic=False, seed=1),
        "dare_linear_no_rescale": Case({
            "models": [{"model": a, "parameters": {"density": 0.6, "weight": 0.5}},
                       {"model": b, "parameters": {"density": 0.6, "weight": 0.5}}],
            "merge_method": "dare_linear", "base_model": base, "parameters": {"rescale": False}},
            deterministic=False, seed=2),
        "della_card": Case({
            "models": [{"model": a, "parameters": {"density": 0.5, "weight": 0.5, "epsilon": 0.1}},
                       {"model": b, "parameters": {"density": 0.5, "weight": 0.5}}],
            "merge_method": "della", "base_model": base, "parameters": {"lambda": 1.1, "normalize": True}},
            deterministic=False, seed=3),
        "breadcrumbs_ties_card": Case({
            "models": [{"model": a, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.02}},
                       {"model": b, "parameters": {"weight": 0.5, "density": 0.8}}],
            "merge_method": "breadcrumbs_ties", "base_model": base, "parameters": {"gamma": 0.01},
            "dtype": "bfloat16"}),
        "task_arithmetic_out_dtype": Case({
            "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.3}}],
            "merge_method": "task_arithmetic", "base_model": base, "parameters": {"lambda": 0.8},
            "dtype": "float32", "out_dtype": "bfloat16"}),
        # model_stock cards give every model a weight, which model_stock does not have.
        "model_stock_with_weights": Case({
            "models": [{"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}},
                       {"model": c, "parameters": {"weight": 1.0}}],
            "merge_method": "model_stock", "base_model": base, "dtype": "bfloat16"},
            warned=(f"models[0] ({a}).parameters.weight", f"models[1] ({b}).parameters.weight",
                    f"models[2] ({c}).parameters.weight")),
        "model_stock_filter_wise": Case({
            "models": [{"model": a}, {"model": b}], "merge_method": "model_stock", "base_model": base,
            "parameters": {"filter_wise": True}}),
        # sce with select_topk at the top level (ignored: the default 1.0 applies) and normalize.
        "sce_select_topk_misplaced": Case({
            "name": "sce-merge", "merge_method": "sce", "base_model": base, "select_topk": 0.3,
            "models": [{"model": a}, {"model": b}], "parameters": {"normalize": True}},
            warned=("name", "select_topk", "parameters.normalize")),
        "sce_card": Case({
            "merge_method": "sce", "base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}],
            "parameters": {"select_topk": 0.6}, "dtype": "bfloat16"}),
        "multislerp_normalize": Case({
            "merge_method": "multislerp", "models": [{"model": a, "parameters": {"weight": 0.5}},
                                                     {"model": b, "parameters": {"weight": 0.3}},
                                                     {"model": c, "parameters": {"weight": 0.2}}],
            "parameters": {"normalize": True}},
            warned=("parameters.normalize",)),
        "multislerp_with_base": Case({
            "merge_method": "multislerp", "base_model": base,
            "models": [{"model": a, "parameters": {"weight": 1}}, {"model": b, "parameters": {"weight": 1}}],
            "parameters": {"normalize_weights": False}}),
        "nuslerp_card": Case({
            "merge_method": "nuslerp", "base_model": base,
            "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}),
        "karcher_card": Case({
            "merge_method": "karcher", "models": [{"model": a}, {"model": b}, {"model": c}],
            "parameters": {"max_iter": 20, "tol": 1e-6}}),
        "linear_typo_and_padding": Case({
            "merge_method": "linear", "dype": "bfloat16", "pad_to_multiple_of": 64,
            "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}],
            "parameters": {"normalize": "yes"}},
            warned=("dype", "pad_to_multiple_of", "parameters.normalize")),
        "linear_union_tokenizer_chatml": Case({
            "merge_method": "linear", "tokenizer_source": "union", "chat_template": "chatml",
            "models": [{"model": a, "parameters": {"weight": 1}}, {"model": b, "parameters": {"weight": 1}}],
            "dtype": "torch.float16"}),
        "linear_tokenizer_block": Case({
            "merge_method": "linear", "base_model": a,
            "tokenizer": {"source": "base", "pad_to_multiple_of": 8},
            "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]}),
        # A frankenmerge (goliath style): overlapping slices of two models, one pinned to a revision.
        "passthrough_frankenmerge": Case({
            "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                       {"sources": [{"model": b, "layer_range": [1, 3], "revision": "main"}]},
                       {"sources": [{"model": a, "layer_range": [2, 4]}]}],
            "merge_method": "passthrough", "dtype": "float16"},
            warned=("slices[1].sources[0].revision",)),
        # A revision pinned the way both tools read it (a local directory has no revisions).
        "linear_pinned_revision": Case({
            "merge_method": "linear", "models": [{"model": f"{a}@main", "parameters": {"weight": 0.5}},
                                                 {"model": b, "parameters": {"weight": 0.5}}]}),
        # Per-source and per-slice parameters in the slices form.
        "ties_slices_per_source": Case({
            "slices": [{"sources": [{"model": base, "layer_range": [0, 4]},
                                    {"model": a, "layer_range": [0, 4], "parameters": {"weight": 0.7, "density": 0.6}},
                                    {"model": b, "layer_range": [0, 4], "parameters": {"weight": 0.3}}],
                        "parameters": {"density": 0.4}}],
            "merge_method": "ties", "base_model": base, "parameters": {"normalize": False}}),
        # modules: mergekit's per-module form; the one module of a decoder-only model is "default", whose
        # parameters rank between the slice's and the global ones.
        "modules_slices": Case({
            "modules": {"default": {"slices": [{"sources": pair(0, 2)},
                                               {"sources": pair(2, 4), "parameters": {"t": 0.9}}],
                                    "parameters": {"t": [0.2, 0.6]}}},
            "merge_method": "slerp", "base_model": a, "parameters": {"t": 0.5}}),
        "modules_models": Case({
            "modules": {"default": {"models": [{"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
                                               {"model": b, "parameters": {"weight": 0.4, "density": 0.7}}],
                                    "parameters": {"normalize": False}}},
            "merge_method": "ties", "base_model": base}),
        "nearswap_card": Case({
            "merge_method": "nearswap", "base_model": base, "models": [{"model": base}, {"model": a}],
            "parameters": {"t": 0.02}}),
        "arcee_fusion_card": Case({
            "merge_method": "arcee_fusion", "base_model": base, "models": [{"model": base}, {"model": a}]}),
        "ram_card": Case({
            "merge_method": "ramplus_tl", "base_model": base, "models": [{"model": a}, {"model": b}],
            "parameters": {"r": 0.2, "alpha": 0.3}}),
        # mergekit's arcee_fusion result is float32 (its mask is), and mergekit writes it so; evomerge writes
        # the recipe's dtype.
        "arcee_fusion_bf16": Case({
            "merge_method": "arcee_fusion", "base_model": base, "models": [{"model": base}, {"model": a}],
            "dtype": "bfloat16"}, float32_in_mergekit=True),
        # A parameter meant for the whole merge given per model: mergekit reads it only globally.
        "ties_normalize_per_model": Case({
            "merge_method": "ties", "base_model": base,
            "models": [{"model": a, "parameters": {"weight": 1, "density": 0.5, "normalize": False}},
                       {"model": b, "parameters": {"weight": 1, "density": 0.5}}]},
            warned=(f"models[0] ({a}).parameters.normalize",)),
    }


CASES = list(corpus({k: k for k in ("base", "ft1", "ft2", "ft3")}))


def _warnings(recipe: dict, **kwargs) -> list[str]:
    messages: list[str] = []
    load_recipe(recipe, warn=messages.append, **kwargs)
    return messages


@pytest.mark.parametrize("name", CASES)
def test_corpus_recipe_merges_like_mergekit_and_names_what_it_ignores(fam, tmp_path, name):
    case = corpus(fam)[name]
    messages = _warnings(case.recipe)
    assert [m.removeprefix("recipe: ").split(": ", 1)[0] for m in messages] == list(case.warned), messages
    assert all("ignored, as mergekit does" in m or "as mergekit reads it" in m for m in messages), messages

    expected = run_mergekit(case.recipe, tmp_path / "mergekit", seed=case.seed)
    merge(load_recipe(case.recipe, warn=lambda m: None), tmp_path / "evomerge", seed=case.seed,
          copy_tokenizer=False, tie_break="mergekit")
    got = load_weights(tmp_path / "evomerge")
    assert sorted(got) == sorted(expected)
    for tensor, want in expected.items():
        if case.float32_in_mergekit:
            assert want.dtype == torch.float32
            want = want.to(got[tensor].dtype)
        assert got[tensor].dtype == want.dtype and got[tensor].shape == want.shape, tensor
        if not case.deterministic:
            continue
        if want.dtype == torch.float32:
            diff = (got[tensor].double() - want.double()).abs().max().item()
            assert diff <= 1e-6, f"{name}: {tensor} differs by {diff}"
        else:
            assert _ulps(got[tensor], want) <= 1, f"{name}: {tensor}"


@pytest.mark.parametrize("name", [n for n in CASES if corpus({k: k for k in ("base", "ft1", "ft2", "ft3")})[n].warned])
def test_strict_refuses_what_mergekit_would_ignore(name):
    case = corpus({k: k for k in ("base", "ft1", "ft2", "ft3")})[name]
    with pytest.raises(EvomergeError, match=r"--strict"):
        load_recipe(case.recipe, strict=True)


def test_warnings_say_what_applies_instead():
    messages = _warnings({"merge_method": "sce", "base_model": "b", "models": [{"model": "1"}, {"model": "2"}],
                          "select_topk": 0.3, "dype": "float16", "dtype": "bfloat16",
                          "parameters": {"normalize": 1}})
    assert messages == [
        "recipe: select_topk: ignored, as mergekit does: 'select_topk' is a parameter of sce and goes under "
        "'parameters'; select_topk = 1.0 (its default) applies",
        "recipe: dype: ignored, as mergekit does: unknown key 'dype', did you mean 'dtype'? "
        "(dtype = 'bfloat16' applies)",
        "recipe: parameters.normalize: ignored, as mergekit does: sce has no parameter 'normalize' "
        "(known here: int8_mask, select_topk)"]
    lenient = _warnings({"merge_method": "ties", "base_model": "b", "parameters": {"normalize": 1.0},
                         "models": [{"model": "1", "parameters": {"weight": True, "desnity": 0.5}}]})
    assert lenient == [
        "recipe: parameters.normalize: 1.0 read as True, as mergekit reads it (write True)",
        "recipe: models[0] (1).parameters.weight: True read as 1.0, as mergekit reads it (write 1.0)",
        "recipe: models[0] (1).parameters.desnity: ignored, as mergekit does: ties has no parameter 'desnity'; "
        "did you mean 'density'? (known here: density, weight)"]


def test_wrong_values_stay_errors_whatever_the_strictness():
    for per_model, shared, message in (({"density": 1.5, "weight": 1}, {}, "density must be in"),
                                       ({"weight": "heavy"}, {}, "expected a number, got 'heavy'"),
                                       ({"weight": 1}, {"normalize": 2}, "expected true or false, got 2")):
        recipe = {"merge_method": "ties", "base_model": "b", "models": [{"model": "1", "parameters": per_model}],
                  "parameters": shared}
        with pytest.raises(EvomergeError, match=message):
            load_recipe(recipe, warn=lambda m: None)


def test_modules_other_than_default_are_refused():
    with pytest.raises(EvomergeError, match="modules: evomerge merges single-module models.*'vision_tower'"):
        load_recipe({"merge_method": "linear", "modules": {"vision_tower": {"models": [{"model": "a"}]}}})


def test_slerp_base_outside_its_sources_is_refused_as_mergekit_refuses_it(fam, tmp_path):
    recipe = {"merge_method": "slerp", "base_model": fam["base"], "parameters": {"t": 0.3},
              "slices": [{"sources": [{"model": fam["ft1"], "layer_range": [0, 4]},
                                      {"model": fam["ft2"], "layer_range": [0, 4]}]}]}
    with pytest.raises(Exception):
        run_mergekit(recipe, tmp_path / "mergekit")
    with pytest.raises(EvomergeError, match=r"slices\[0\]: slerp interpolates from its base_model \(t=0\).*"
                                            r"not among the slice's sources"):
        merge(load_recipe(recipe), tmp_path / "evomerge")
    assert not (tmp_path / "evomerge").exists()
