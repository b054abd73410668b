"""Every example recipe (the seeds' recipes, pointed at the demo family) merges unchanged, loads and generates;
the example mergekit-evolve config is a valid search of the same family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from search import demo
from search.cli import main

pytestmark = pytest.mark.slow  # trains the demo family, runs searches or worker processes

ROOT = Path(__file__).resolve().parent.parent
EVOLVE_CONFIGS = sorted(p for p in (ROOT / "configs" / "examples").glob("*.yaml")
                        if "genome" in yaml.safe_load(p.read_text()))
EXAMPLES = sorted(set((ROOT / "configs" / "examples").glob("*.yaml")) - set(EVOLVE_CONFIGS))


@pytest.fixture(scope="module")
def family():
    return demo.build_zoo(ROOT / demo.DEFAULT_ZOO_DIR)


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda p: p.stem)
def test_example_recipe_merges_loads_and_generates(family, recipe, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(ROOT)
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--seed", "0", "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("rev abc=", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    written = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert written["merge_method"] == yaml.safe_load(recipe.read_text())["merge_method"]


def test_examples_cover_every_recipe_shape_of_the_seeds():
    methods = {yaml.safe_load(p.read_text())["merge_method"] for p in EXAMPLES}
    assert {"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "passthrough", "moe"} <= methods


def test_there_is_an_example_mergekit_evolve_config():
    assert [p.name for p in EVOLVE_CONFIGS] == ["mergekit_evolve.yaml"]


@pytest.mark.parametrize("config", EVOLVE_CONFIGS, ids=lambda p: p.stem)
def test_example_mergekit_evolve_config_validates_as_the_demo_search(family, config, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["validate", str(config)]) == 0
    assert capsys.readouterr().err == ""  # no ignored key
    assert main(["search", str(config), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    demo_config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for key in ("base_model", "models", "method", "fixed", "include_path", "n_trials", "seed"):
        assert printed[key] == demo_config[key], key
    assert [t["name"] for t in printed["tasks"]] == [t["name"] for t in demo_config["tasks"]]
    assert set(printed["parameters"]) == set(demo_config["parameters"])
