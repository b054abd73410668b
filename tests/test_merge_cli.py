"""`evomerge merge`: a working merge end to end, and every kind of bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.families import make_family


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    paths = {k: str(v) for k, v in make_family(root, "llama").items()}
    paths.update({f"gpt2_{k}": str(v) for k, v in make_family(root, "gpt2", n_finetunes=1).items()})
    return paths


def evomerge(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def write_recipe(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def linear(fam, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": fam["ft1"], "parameters": {"weight": 0.5}},
                                                 {"model": fam["ft2"], "parameters": {"weight": 0.5}}], **extra}


def test_merge_writes_a_loadable_checkpoint_that_generates(fam, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(tmp_path, linear(fam, dtype="bfloat16"))
    result = evomerge("merge", recipe, tmp_path / "out", "--out-shard-size", "20KB")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {"config.json", "tokenizer.json", "mergekit_config.yml", "README.md"} <= {p.name for p in out.iterdir()}
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "linear"
    assert fam["ft1"] in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    generated = model.generate(**tok("t1 t2 t3", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == 3 + 4


def test_linear_weights_one_zero_return_the_first_model(fam, tmp_path):
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": fam["ft1"], "parameters": {"weight": 1.0}}, {"model": fam["ft2"], "parameters": {"weight": 0.0}}]})
    assert evomerge("merge", recipe, tmp_path / "out").returncode == 0
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(f"{fam['ft1']}/model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_task_arithmetic_is_base_plus_weighted_deltas(fam, tmp_path):
    recipe = write_recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": fam["base"], "models": [
        {"model": fam["ft1"], "parameters": {"weight": 0.7}}, {"model": fam["ft2"], "parameters": {"weight": -0.2}}]})
    assert evomerge("merge", recipe, tmp_path / "out").returncode == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    base, a, b = (load_file(f"{fam[k]}/model.safetensors") for k in ("base", "ft1", "ft2"))
    for name in base:
        assert torch.allclose(got[name], base[name] + 0.7 * (a[name] - base[name]) - 0.2 * (b[name] - base[name]),
                              atol=1e-6)


def test_slerp_endpoints_return_the_models(fam, tmp_path):
    for t, expected in ((0.0, "ft1"), (1.0, "ft2")):
        recipe = write_recipe(tmp_path, {"merge_method": "slerp", "slices": [{"sources": [
            {"model": fam["ft1"], "layer_range": [0, 4]}, {"model": fam["ft2"], "layer_range": [0, 4]}]}],
            "parameters": {"t": t}})
        assert evomerge("merge", recipe, tmp_path / f"out{t}").returncode == 0
        got = load_file(tmp_path / f"out{t}" / "model.safetensors")
        want = load_file(f"{fam[expected]}/model.safetensors")
        assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)


def test_passthrough_layer_counts(fam, tmp_path):
    recipe = write_recipe(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": fam["ft1"], "layer_range": [0, 3]}]},
        {"sources": [{"model": fam["ft2"], "layer_range": [1, 4]}]},
        {"sources": [{"model": fam["base"], "layer_range": [3, 4]}]}]})
    assert evomerge("merge", recipe, tmp_path / "out").returncode == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 7
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert max(int(n.split(".")[2]) for n in got if n.startswith("model.layers.")) == 6


def _bad_cases(fam, tmp_path):
    nan_model = tmp_path / "nan_model"
    shutil.copytree(fam["ft2"], nan_model)
    weights = load_file(nan_model / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(weights, nan_model / "model.safetensors", metadata={"format": "pt"})
    pickle_model = tmp_path / "pickle_model"
    shutil.copytree(fam["ft2"], pickle_model)
    torch.save(load_file(pickle_model / "model.safetensors"), pickle_model / "pytorch_model.bin")
    (pickle_model / "model.safetensors").unlink()
    bigger_vocab = tmp_path / "bigger_vocab"
    shutil.copytree(fam["ft2"], bigger_vocab)
    weights = load_file(bigger_vocab / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = torch.cat([weights[name], weights[name][:4]])
    save_file(weights, bigger_vocab / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((bigger_vocab / "config.json").read_text())
    (bigger_vocab / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 4}))
    two = [{"model": fam["ft1"]}, {"model": fam["ft2"]}]
    return {
        "unknown method": ({"merge_method": "averaging", "models": two}, "unknown method 'averaging'"),
        "slerp with 3 models": ({"merge_method": "slerp", "base_model": fam["base"], "models": two,
                                 "parameters": {"t": 0.5}}, "slerp needs"),
        "density above 1": ({"merge_method": "ties", "base_model": fam["base"], "models": [
            {"model": fam["ft1"], "parameters": {"weight": 1, "density": 1.5}}]}, "density must be in (0, 1], got 1.5"),
        "weight not a number": ({"merge_method": "linear", "models": [
            {"model": fam["ft1"], "parameters": {"weight": "heavy"}}]}, "expected a number, got 'heavy'"),
        "layer_range beyond model": ({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": fam["ft1"], "layer_range": [0, 9]}]}]}, "beyond its 4 layers"),
        "different architectures": ({"merge_method": "linear", "models": [
            {"model": fam["ft1"], "parameters": {"weight": 1}},
            {"model": fam["gpt2_ft1"], "parameters": {"weight": 1}}]}, "different architectures"),
        "vocab sizes differ": ({"merge_method": "linear", "models": [
            {"model": fam["ft1"], "parameters": {"weight": 1}},
            {"model": str(bigger_vocab), "parameters": {"weight": 1}}]}, "vocabulary sizes differ"),
        "missing model": ({"merge_method": "linear", "models": [
            {"model": str(tmp_path / "nowhere"), "parameters": {"weight": 1}}]}, "nowhere"),
        "pickle without --allow-pickle": ({"merge_method": "linear", "models": [
            {"model": str(pickle_model), "parameters": {"weight": 1}}]}, "--allow-pickle"),
        "result with inf": ({"merge_method": "linear", "models": [
            {"model": fam["ft1"], "parameters": {"weight": 1}},
            {"model": str(nan_model), "parameters": {"weight": 1}}]}, "model.layers.1.mlp.up_proj.weight"),
    }


def test_bad_input_is_one_line_exit_2_and_writes_nothing(fam, tmp_path):
    for case, (recipe, expected) in _bad_cases(fam, tmp_path).items():
        path = write_recipe(tmp_path, recipe)
        out = tmp_path / "out"
        result = evomerge("merge", path, out)
        assert result.returncode == 2, f"{case}: {result.stderr}"
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, f"{case}: {result.stderr}"
        assert expected in lines[0], f"{case}: {lines[0]}"
        assert not out.exists(), case
        assert not list(tmp_path.glob(".out*")), f"{case}: temporary output left behind"


def test_keys_mergekit_ignores_are_one_warning_line_each_and_strict_refuses_them(fam, tmp_path):
    recipe = linear(fam, name="my-merge", dtypo="float32")
    recipe["models"][1]["revision"] = "main"
    path = write_recipe(tmp_path, recipe)
    result = evomerge("merge", path, tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("evomerge merge: warning: ")]
    assert len(warnings) == 3, result.stderr
    assert [w.split(": ")[3] for w in warnings] == ["dtypo", "models[1].revision", "name"]  # safe_dump sorts keys
    assert "did you mean 'dtype'?" in warnings[0]
    strict = evomerge("merge", path, tmp_path / "strict", "--strict")
    lines = strict.stderr.strip().splitlines()
    assert strict.returncode == 2 and len(lines) == 1 and "dtypo" in lines[0], strict.stderr
    assert not (tmp_path / "strict").exists()


def test_full_disk_is_one_line_exit_2_and_leaves_nothing(fam, tmp_path, monkeypatch, capsys):
    """The shards' space is taken before any tensor is merged, so a full disk is an error there, not a
    crash (SIGBUS) on a write through the mapped output."""
    import errno
    import os

    from search.cli import main

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    path = write_recipe(tmp_path, linear(fam))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no room for" in lines[0] and "No space left on device" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_missing_shard_is_named(fam, tmp_path):
    sharded = tmp_path / "sharded"
    assert evomerge("merge", write_recipe(tmp_path, linear(fam)), sharded, "--out-shard-size", "20KB").returncode == 0
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    result = evomerge("merge", write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(sharded), "parameters": {"weight": 1}}]}), tmp_path / "out")
    assert result.returncode == 2 and victim.name in result.stderr


def test_pickle_checkpoint_merges_with_allow_pickle(fam, tmp_path):
    pickle_model = tmp_path / "pickle_model"
    shutil.copytree(fam["ft2"], pickle_model)
    torch.save(load_file(pickle_model / "model.safetensors"), pickle_model / "pytorch_model.bin")
    (pickle_model / "model.safetensors").unlink()
    recipe = write_recipe(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(pickle_model), "parameters": {"weight": 1}}]})
    assert evomerge("merge", recipe, tmp_path / "out", "--allow-pickle").returncode == 0
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(f"{fam['ft2']}/model.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_existing_output_needs_force(fam, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    recipe = write_recipe(tmp_path, linear(fam))
    result = evomerge("merge", recipe, out)
    assert result.returncode == 2 and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    assert evomerge("merge", recipe, out, "--force").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_same_seed_gives_identical_bytes_for_stochastic_methods(fam, tmp_path):
    recipe = write_recipe(tmp_path, {"merge_method": "dare_ties", "base_model": fam["base"], "models": [
        {"model": fam["ft1"], "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": fam["ft2"], "parameters": {"weight": 0.4, "density": 0.5}}], "parameters": {"int8_mask": True}})
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert evomerge("merge", recipe, tmp_path / name, "--seed", seed).returncode == 0
    a, b, c = ((tmp_path / n / "model.safetensors").read_bytes() for n in "abc")
    assert a == b and a != c
