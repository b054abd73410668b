"""The vLLM evaluation backend. Without CUDA (every CI machine) the engine is stood in for by a second copy of
the model that takes weights by their Hugging Face names, as vLLM's ``load_weights`` does: the weight-name
mapping, the push before every score, the request building and the score assembly are tested here. The
comparison of the two backends on a real engine needs CUDA and vLLM and skips with that reason elsewhere;
``benchmarks/gpu_check.sh`` runs it on a GPU machine."""

from __future__ import annotations

import copy
from importlib.util import find_spec

import pytest
import torch

from evaluators import LmEvalEvaluator, vllm_backend
from evaluators._vllm_compat import push_weights
from merge_core.errors import EvomergeError
from search.config import SearchConfig
from tests.test_evaluators import FIXTURE_TASKS, make_tiny_model

CUDA_AND_VLLM = torch.cuda.is_available() and find_spec("vllm") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-vllm")
    model, tokenizer = make_tiny_model(model_dir)
    return model_dir, model, tokenizer


class EngineModel:
    """What vLLM's ``LLM`` offers the backend: ``apply_model`` over a model whose ``load_weights`` takes
    checkpoint names (here a plain copy of the live model, tied embedding included)."""

    def __init__(self, model):
        self.model = model
        self.loaded: list[list[str]] = []
        self.resets = 0

    def apply_model(self, fn):
        fn(self)

    def load_weights(self, weights):
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in weights:
                state[name].copy_(tensor)
        self.loaded.append([name for name, _ in weights])

    def reset_prefix_cache(self):
        self.resets += 1


class FakeEngine:
    """``VllmEngine`` with the engine stood in for: the same ``sync``, lm-eval's HF model over the copy."""

    instances: list = []

    def __init__(self, pretrained, *, dtype, seed=0, model_args=None):
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM, AutoTokenizer

        copy_ = AutoModelForCausalLM.from_pretrained(pretrained).eval()
        self.llm = EngineModel(copy_)
        self.lm = HFLM(pretrained=copy_, tokenizer=AutoTokenizer.from_pretrained(pretrained),
                                     batch_size=8)
        FakeEngine.instances.append(self)

    def sync(self, model):
        push_weights(self.llm, vllm_backend.engine_weights(model))
        self.llm.reset_prefix_cache()
        return self.lm


def test_engine_weights_are_the_checkpoints_names_without_the_tied_output_embedding_and_without_copies(tiny):
    _, model, _ = tiny
    state = model.state_dict()
    weights = dict(vllm_backend.engine_weights(model))  # untied: every tensor, lm_head included
    assert set(weights) == set(state) and all(weights[n].data_ptr() == state[n].data_ptr() for n in weights)
    tied = copy.deepcopy(model)
    tied.config.tie_word_embeddings = True
    tied.lm_head.weight = tied.get_input_embeddings().weight
    assert set(dict(vllm_backend.engine_weights(tied))) == set(state) - {"lm_head.weight"}


def test_the_vllm_backend_pushes_each_candidates_weights_and_scores_like_the_hf_backend(tiny, monkeypatch):
    model_dir, model, tokenizer = tiny
    monkeypatch.setattr(vllm_backend, "VllmEngine", FakeEngine)
    monkeypatch.setattr(vllm_backend, "check_vllm", lambda device: None)
    FakeEngine.instances.clear()
    tasks = ["fx_pick", "fx_yesno"]
    hf = LmEvalEvaluator(tasks, include_path=FIXTURE_TASKS)
    vllm = LmEvalEvaluator(tasks, include_path=FIXTURE_TASKS, backend="vllm", engine={"pretrained": str(model_dir)})
    original = {n: t.clone() for n, t in model.state_dict().items()}
    try:
        for step in range(2):
            expected, got = hf.score(model, tokenizer), vllm.score(model, tokenizer)
            for task in tasks:
                assert got.tasks[task].metrics == pytest.approx(expected.tasks[task].metrics, abs=1e-6)
                for metric, values in expected.tasks[task].samples.items():
                    assert got.tasks[task].samples[metric] == pytest.approx(values, abs=1e-6)
            with torch.no_grad():  # the next candidate, changed in place as the search does
                model.model.layers[0].mlp.down_proj.weight.mul_(-2.0)
        engine = FakeEngine.instances[0]
        assert len(FakeEngine.instances) == 1  # one engine for every candidate
        assert len(engine.llm.loaded) == 2 and engine.llm.resets == 2
        assert set(engine.llm.loaded[0]) == set(model.state_dict())  # untied: every tensor, by its HF name
    finally:
        model.load_state_dict(original)


def test_a_vllm_search_config_needs_cuda_and_the_package(tiny):
    model_dir, _, _ = tiny
    data = {"base_model": str(model_dir), "models": [str(model_dir)], "evaluator": "vllm",
            "parameters": {"weight": {"low": 0, "high": 1}}, "tasks": [{"name": "fx_pick"}]}
    with pytest.raises(ValueError, match="evaluator: vllm runs on CUDA; set device: cuda"):
        SearchConfig.model_validate(data)
    if not torch.cuda.is_available():
        with pytest.raises(EvomergeError, match="evaluator: vllm runs on CUDA"):
            LmEvalEvaluator(["fx_pick"], include_path=FIXTURE_TASKS, backend="vllm",
                            engine={"pretrained": str(model_dir)})


def test_vllm_engine_api_the_adapter_uses_exists():
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (it needs CUDA): the adapter is untested here")
    assert callable(getattr(vllm.LLM, "apply_model", None)), "vllm.LLM.apply_model moved: fix evaluators/_vllm_compat"
    assert callable(getattr(vllm.LLM, "reset_prefix_cache", None))


@pytest.mark.skipif(not CUDA_AND_VLLM, reason="needs CUDA and vLLM (run benchmarks/gpu_check.sh on a GPU machine)")
def test_vllm_and_hf_backends_agree_on_one_model(tiny):
    """Loglikelihood within 1e-3, greedy exact match equal on at least 95% of items."""
    model_dir, _, _ = tiny
    from evaluators.loading import load_model

    model, tokenizer = load_model(model_dir, device="cuda")
    hf = LmEvalEvaluator(["fx_pick", "fx_yesno"], include_path=FIXTURE_TASKS, device="cuda")
    vllm = LmEvalEvaluator(["fx_pick", "fx_yesno"], include_path=FIXTURE_TASKS, device="cuda", backend="vllm",
                           engine={"pretrained": str(model_dir), "dtype": "float32"})
    a, b = hf.score(model, tokenizer), vllm.score(model, tokenizer)
    for task in a.tasks:
        for metric, values in a.tasks[task].samples.items():
            same = sum(abs(x - y) <= 1e-3 for x, y in zip(values, b.tasks[task].samples[metric]))
            assert same >= 0.95 * len(values), (task, metric)
