"""Tokenizer merging: models whose tokenizers differ merge row by token, not by row index, as in mergekit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from merge_core import load_recipe, merge
from merge_core.errors import EvomergeError
from search.cli import main
from tests.families import make_family

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
SPECIAL = "<|special_token|>"


def _rewrite(src: Path, dst: Path, order: list[str], extra: dict[str, torch.Tensor], special: set[str]) -> None:
    """A copy of ``src`` whose tokenizer lists ``order`` then ``extra`` tokens, with rows moved to match."""
    shutil.copytree(src, dst)
    spec = json.loads((src / "tokenizer.json").read_text())
    old = spec["model"]["vocab"]
    spec["model"]["vocab"] = {token: i for i, token in enumerate(order)}
    spec["added_tokens"] = [{**entry, "id": order.index(entry["content"])} for entry in spec["added_tokens"]]
    for k, token in enumerate(extra):
        spec["added_tokens"].append({"id": len(order) + k, "content": token, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": token not in special,
                                     "special": token in special})
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    tok_config = json.loads((dst / "tokenizer_config.json").read_text())
    tok_config.pop("added_tokens_decoder", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_config))
    weights = load_file(src / "model.safetensors")
    for name in EMBEDDINGS:
        rows = weights[name][[old[t] for t in order]]
        weights[name] = torch.cat([rows, *[row[None] for row in extra.values()]])
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "vocab_size": len(order) + len(extra)}))


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """base and ft1 share a tokenizer; "reordered" (ft2) lists it in another order and adds two tokens."""
    root = tmp_path_factory.mktemp("tok")
    paths = make_family(root, "llama", n_finetunes=3)
    vocab = json.loads((paths["ft2"] / "tokenizer.json").read_text())["model"]["vocab"]
    order = sorted(vocab, key=lambda t: (vocab[t] * 37) % len(vocab))
    gen = torch.Generator().manual_seed(5)
    extra = {SPECIAL: torch.randn(32, generator=gen), "t_extra": torch.randn(32, generator=gen)}
    _rewrite(paths["ft2"], root / "reordered", order, extra, {SPECIAL})
    _rewrite(paths["ft3"], root / "added", list(vocab), {"t_other": torch.randn(32, generator=gen)}, set())
    return {**{k: str(v) for k, v in paths.items()}, "reordered": str(root / "reordered"),
            "added": str(root / "added")}


def rows_by_token(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    weights = {}
    for shard in out.glob("*.safetensors"):
        weights.update(load_file(shard))
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    return {name: {tok: weights[name][i] for tok, i in vocab.items()} for name in EMBEDDINGS}


def source_rows(path: str) -> dict[str, dict[str, torch.Tensor]]:
    return rows_by_token(Path(path))


def linear(fam, **tokenizer) -> dict:
    return {"merge_method": "linear", "base_model": fam["base"], "dtype": "float32", "models": [
        {"model": fam["base"], "parameters": {"weight": 0.5}},
        {"model": fam["reordered"], "parameters": {"weight": 0.3}},
        {"model": fam["added"], "parameters": {"weight": 0.2}}], **tokenizer}


def test_union_rows_of_shared_tokens_equal_the_plain_merge(fam, tmp_path):
    merge(load_recipe(linear(fam, tokenizer_source="union")), tmp_path / "out")
    got = rows_by_token(tmp_path / "out")
    base, reordered, added = (source_rows(fam[k]) for k in ("base", "reordered", "added"))
    assert set(got[EMBEDDINGS[0]]) == set(base[EMBEDDINGS[0]]) | {SPECIAL, "t_extra", "t_other"}
    for name in EMBEDDINGS:
        for token in base[name]:
            expected = 0.5 * base[name][token] + 0.3 * reordered[name][token] + 0.2 * added[name][token]
            assert torch.allclose(got[name][token], expected, atol=1e-6), (name, token)
        # a token only one model has: every model gets that model's row, so the merge returns it
        assert torch.allclose(got[name][SPECIAL], reordered[name][SPECIAL], atol=1e-6)
        assert torch.allclose(got[name]["t_other"], added[name]["t_other"], atol=1e-6)


def test_union_output_loads_generates_and_keeps_special_tokens(fam, tmp_path):
    merge(load_recipe({**linear(fam, tokenizer_source="union"), "chat_template": "chatml"}), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == len(tok) == 96 + 3
    assert SPECIAL in tok.all_special_tokens or SPECIAL in [t.content for t in tok.added_tokens_decoder.values()
                                                            if t.special]
    assert tok.eos_token == "</s>" and "im_start" in tok.chat_template
    ids = tok(f"t1 {SPECIAL} t_other", return_tensors="pt")
    assert ids["input_ids"].shape[1] == 3
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == 3 + 4


@pytest.mark.parametrize("case", ["union", "union_with_tokens", "model_source", "pad"])
def test_rows_equal_mergekit(fam, tmp_path, case):
    mergekit_config = pytest.importorskip("mergekit.config")
    from mergekit.merge import MergeOptions, run_merge

    tokens = {SPECIAL: {"source": fam["reordered"]}, "t_new": {"source": {"kind": "zero"}},
              "t5": {"source": {"kind": "model_token", "model": fam["added"], "token": "t_other"}, "force": True}}
    recipe = {
        "union": linear(fam, tokenizer_source="union"),
        "union_with_tokens": linear(fam, tokenizer={"source": "union", "tokens": tokens}),
        "model_source": linear(fam, tokenizer_source=fam["reordered"]),
        "pad": linear(fam, tokenizer={"source": "union", "pad_to_multiple_of": 64}),
    }[case]
    run_merge(mergekit_config.MergeConfiguration.model_validate(recipe), str(tmp_path / "mergekit"),
              MergeOptions(quiet=True))
    merge(load_recipe(recipe), tmp_path / "evomerge")
    expected, got = rows_by_token(tmp_path / "mergekit"), rows_by_token(tmp_path / "evomerge")
    for name in EMBEDDINGS:
        assert set(got[name]) == set(expected[name])
        for token in expected[name]:
            assert torch.allclose(got[name][token], expected[name][token], atol=1e-6), (case, name, token)
    size = json.loads((tmp_path / "mergekit" / "config.json").read_text())["vocab_size"]
    assert json.loads((tmp_path / "evomerge" / "config.json").read_text())["vocab_size"] == size
    weights = load_file(tmp_path / "evomerge" / "model.safetensors")
    reference = load_file(tmp_path / "mergekit" / "model.safetensors")
    assert weights[EMBEDDINGS[0]].shape == reference[EMBEDDINGS[0]].shape
    if case == "pad":  # padding rows: the mean of the real rows
        assert torch.allclose(weights[EMBEDDINGS[0]][-1], reference[EMBEDDINGS[0]][-1], atol=1e-6)


def test_seed_recipe_without_weights_averages(fam, tmp_path, capsys):
    """The seeds' tokenizer recipe gives linear no weights: mergekit refuses it, evomerge averages."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": fam["base"]}, {"model": fam["reordered"]}],
        "tokenizer": {"source": "union", "tokens": {SPECIAL: {"source": fam["reordered"]}}}}))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0, capsys.readouterr().err
    got = rows_by_token(tmp_path / "out")
    base, reordered = source_rows(fam["base"]), source_rows(fam["reordered"])
    for token in base[EMBEDDINGS[0]]:
        assert torch.allclose(got[EMBEDDINGS[0]][token], (base[EMBEDDINGS[0]][token]
                                                          + reordered[EMBEDDINGS[0]][token]) / 2, atol=1e-6)
    assert torch.allclose(got[EMBEDDINGS[0]][SPECIAL], reordered[EMBEDDINGS[0]][SPECIAL], atol=1e-6)


def test_same_vocabulary_without_rule_still_refuses_different_sizes(fam, tmp_path):
    with pytest.raises(EvomergeError, match="vocabulary sizes differ"):
        merge(load_recipe(linear(fam)), tmp_path / "out")


@pytest.mark.parametrize(("tokenizer", "expected"), [
    ({"tokenizer_source": "/nowhere/model"}, "tokenizer source '/nowhere/model' is not one of the recipe's models"),
    ({"tokenizer": {"source": "union", "tokens": {SPECIAL: {"source": "someone/else"}}}},
     f"tokenizer.tokens.{SPECIAL}.source: someone/else is not one of the recipe's models"),
])
def test_token_source_not_among_models_is_one_line_exit_2(fam, tmp_path, capsys, tokenizer, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(linear(fam, **tokenizer)))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"evomerge merge: error: {expected}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("rule", "expected"), [
    ({"source": "MODEL"}, "has no token 't_nowhere'"),
    ({"source": {"kind": "model_token", "model": "MODEL", "token": "t_gone"}}, "token 't_gone' is not in"),
    ({"source": {"kind": "model_token", "model": "MODEL", "token_id": 500}}, "token_id 500 is outside"),
])
def test_token_rules_naming_missing_rows_are_refused(fam, tmp_path, rule, expected):
    rule = json.loads(json.dumps(rule).replace("MODEL", fam["base"]))
    recipe = linear(fam, tokenizer={"source": "union", "tokens": {"t_nowhere": rule}})
    with pytest.raises(EvomergeError, match=expected):
        merge(load_recipe(recipe), tmp_path / "out")
