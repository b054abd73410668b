"""evomerge and mergekit merge the same recipes on the same checkpoints: the results must be equal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_core import load_recipe, merge
from tests.families import make_family

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions, run_merge  # noqa: E402

ARCHS = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {arch: {k: str(v) for k, v in make_family(root, arch).items()} for arch in ARCHS}


def load_weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def run_mergekit(recipe: dict, out, seed: int | None = None) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(recipe), str(out),
              MergeOptions(random_seed=seed, copy_tokenizer=False, write_model_card=False, quiet=True))
    return load_weights(out)


def run_evomerge(recipe: dict, out, seed: int | None = None) -> dict[str, torch.Tensor]:
    merge(load_recipe(recipe), out, seed=seed, copy_tokenizer=False)
    return load_weights(out)


def recipes(f: dict[str, str]) -> dict[str, dict]:
    """One recipe per deterministic method, with non-default parameters where the method has any."""
    base, a, b, c = f["base"], f["ft1"], f["ft2"], f["ft3"]
    two = [{"model": a}, {"model": b}]
    weighted = [{"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": b, "parameters": {"weight": 0.4, "density": 0.7}},
                {"model": c, "parameters": {"weight": 0.3, "density": 0.3}}]
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.3}},
            {"model": c, "parameters": {"weight": 0.2}}]},
        "slerp_gradient_filters": {"merge_method": "slerp", "base_model": a, "slices": [{"sources": [
            {"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.3, 0.7, 0]}, {"value": 0.5}]}},
        "nuslerp": {"merge_method": "nuslerp", "models": [
            {"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}]},
        "nuslerp_with_base": {"merge_method": "nuslerp", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}],
            "parameters": {"nuslerp_row_wise": True}},
        "multislerp": {"merge_method": "multislerp", "models": [
            {"model": a, "parameters": {"weight": 1}}, {"model": b, "parameters": {"weight": 2}},
            {"model": c, "parameters": {"weight": 1}}]},
        "karcher": {"merge_method": "karcher", "models": [{"model": a}, {"model": b}, {"model": c}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": weighted,
                            "parameters": {"lambda": 0.9}},
        "ties": {"merge_method": "ties", "base_model": base, "models": weighted, "parameters": {"normalize": True}},
        "ties_int8_mask": {"merge_method": "ties", "base_model": base, "models": weighted,
                           "parameters": {"int8_mask": True, "normalize": False}},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": base, "models": weighted},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": base, "models": weighted,
                             "parameters": {"gamma": 0.02}},
        "sce": {"merge_method": "sce", "base_model": base, "models": two, "parameters": {"select_topk": 0.5}},
        "ram": {"merge_method": "ram", "base_model": base, "models": two},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "models": two},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": two},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "models": [{"model": a}],
                     "parameters": {"t": 0.01}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": a}]},
        "passthrough_frankenmerge": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]},
            {"sources": [{"model": b, "layer_range": [1, 4]}]}]},
        "passthrough_scale": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 4], "parameters": {
                "scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 2.0},
                          {"value": 1.0}]}}]}]},
    }


LLAMA_CASES = list(recipes({"base": "b", "ft1": "1", "ft2": "2", "ft3": "3"}))
OTHER_CASES = ["linear", "slerp_gradient_filters", "task_arithmetic", "ties", "passthrough_frankenmerge"]


def _compare(families, tmp_path, arch: str, case: str, dtype: str | None = None):
    recipe = recipes(families[arch])[case]
    if dtype:
        recipe = {**recipe, "dtype": dtype}
    expected = run_mergekit(recipe, tmp_path / "mergekit")
    got = run_evomerge(recipe, tmp_path / "evomerge")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert got[name].shape == expected[name].shape, name
    return expected, got


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_llama_float32_equals_mergekit(families, tmp_path, case):
    expected, got = _compare(families, tmp_path, "llama", case)
    for name in expected:
        diff = (got[name].double() - expected[name].double()).abs().max().item()
        assert diff <= 1e-6, f"{case}: {name} differs by {diff}"


@pytest.mark.parametrize(("arch", "case"), [(a, c) for a in ("qwen2", "gpt2") for c in OTHER_CASES
                                           if (a, c) != ("qwen2", "passthrough_frankenmerge")])
def test_other_architectures_equal_mergekit(families, tmp_path, arch, case):
    expected, got = _compare(families, tmp_path, arch, case)
    for name in expected:
        diff = (got[name].double() - expected[name].double()).abs().max().item()
        assert diff <= 1e-6, f"{arch} {case}: {name} differs by {diff}"


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Distance in bf16 units in the last place (bit patterns as ordered integers)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    ia = torch.where(ia < 0, -32768 - ia, ia)
    ib = torch.where(ib < 0, -32768 - ib, ib)
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("case", ["linear", "slerp_gradient_filters", "task_arithmetic", "nuslerp", "karcher"])
def test_bfloat16_within_one_ulp_of_mergekit(families, tmp_path, case):
    expected, got = _compare(families, tmp_path, "llama", case, dtype="bfloat16")
    for name in expected:
        assert got[name].dtype == torch.bfloat16
        assert _ulps(got[name], expected[name]) <= 1, f"{case}: {name}"


SPARSIFYING = {"ties": {}, "breadcrumbs": {"gamma": 0.02}, "breadcrumbs_ties": {"gamma": 0.02}}


def _kept_and_cuts(method: str, delta: torch.Tensor, p: dict) -> tuple[int, set[float]]:
    """How many entries the method keeps of one task vector, and the magnitudes where its cuts fall."""
    magnitudes = delta.float().abs().reshape(-1).sort().values
    n = magnitudes.numel()
    if method == "ties":
        k = max(1, int(p["density"] * n))
        return k, {float(magnitudes[n - k])}
    target = int(p["density"] * n)
    dropped = max(0, n - target - int(p["gamma"] * n))
    return target, {float(magnitudes[dropped]), float(magnitudes[dropped + target - 1])}


@pytest.mark.parametrize("method", list(SPARSIFYING))
def test_bfloat16_sparsification_differs_from_mergekit_only_at_entries_tied_at_the_threshold(families, tmp_path,
                                                                                             method):
    """In bf16 many |deltas| equal a cut exactly; mergekit keeps whichever its unstable sort puts first,
    evomerge the lowest indices: per tensor the same number kept, the choice differing only among the
    tied entries. ``tie_break="mergekit"`` makes the same choice as mergekit."""
    f = families["llama"]
    p = {"weight": 1.0, "density": 0.4, **SPARSIFYING[method]}
    recipe = {"merge_method": method, "base_model": f["base"], "dtype": "bfloat16",
              "models": [{"model": f["ft1"], "parameters": p}]}
    expected = run_mergekit(recipe, tmp_path / "mergekit")
    got = run_evomerge(recipe, tmp_path / "evomerge")
    merge(load_recipe(recipe), tmp_path / "mergekit_ties", copy_tokenizer=False, tie_break="mergekit")
    same_choice = load_weights(tmp_path / "mergekit_ties")
    base, model = (load_weights(Path(f[k])) for k in ("base", "ft1"))
    differing = 0
    for name, want in expected.items():
        origin = base[name].bfloat16()
        delta = model[name].bfloat16() - origin
        count, cuts = _kept_and_cuts(method, delta, p)
        kept_mergekit, kept_evomerge = want != origin, got[name] != origin
        assert int(kept_mergekit.sum()) == int(kept_evomerge.sum()) == count, name
        disagree = kept_mergekit ^ kept_evomerge
        assert set(delta.float().abs()[disagree].tolist()) <= cuts, name
        assert torch.equal(got[name][~disagree], want[~disagree]), name
        assert torch.equal(same_choice[name], want), name
        differing += int(disagree.sum())
    assert differing > 0  # the family does tie in bf16: the rule is exercised


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mergekit_tie_break_gives_mergekit_bytes_for_every_sparsifying_method(families, tmp_path, dtype):
    f = families["llama"]
    for method in SPARSIFYING:
        recipe = {**recipes(f)[method], "merge_method": method, "dtype": dtype}
        expected = run_mergekit(recipe, tmp_path / method / "mergekit")
        merge(load_recipe(recipe), tmp_path / method / "evomerge", copy_tokenizer=False, tie_break="mergekit")
        got = load_weights(tmp_path / method / "evomerge")
        assert all(torch.equal(got[name], want) for name, want in expected.items()), method


def test_passthrough_keeps_per_layer_config_lists_where_mergekit_fails(families, tmp_path):
    """Qwen2 configs carry ``layer_types`` (one entry per layer): mergekit 0.1.5 leaves it stale and
    transformers refuses the config; evomerge slices it along with the layers."""
    from transformers import AutoModelForCausalLM

    recipe = recipes(families["qwen2"])["passthrough_frankenmerge"]
    with pytest.raises(Exception, match="layer_types"):
        run_mergekit(recipe, tmp_path / "mergekit")
    got = run_evomerge(recipe, tmp_path / "evomerge")
    source_a, source_b = load_weights(Path(families["qwen2"]["ft1"])), load_weights(Path(families["qwen2"]["ft2"]))
    for out_layer, (source, layer) in enumerate([(source_a, 0), (source_a, 1), (source_a, 2),
                                                 (source_b, 1), (source_b, 2), (source_b, 3)]):
        name = "model.layers.{}.mlp.down_proj.weight"
        assert torch.equal(got[name.format(out_layer)], source[name.format(layer)])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "evomerge")
    assert model.config.num_hidden_layers == 6 and len(model.config.layer_types) == 6
