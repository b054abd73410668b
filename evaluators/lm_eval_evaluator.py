"""Score a live (in-place modified) model on lm-eval tasks, hundreds of times per search, without rebuilding.

``lm_eval.simple_evaluate`` rebuilds tasks, prompts and requests on every call and can only skip that through
an on-disk request cache; its response cache (``use_cache``) would return stale scores once weights change.
Here the expensive, weight-independent part runs once — task building, few-shot prompts, request objects and
their tokenization — and each ``score`` call only runs the model through lm-eval's ``HFLM`` and lets lm-eval's
filters, ``process_results`` and aggregations turn the responses into metrics.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from evaluators._lm_eval_compat import apply_filters, cache_prompt_templates, filter_names
from evaluators.base import Scores, TaskScore
from evaluators.loading import ensure_on_device
from evaluators.tasks import DEFAULT_INCLUDE_PATH, build_tasks, quiet_lm_eval
from merge_core.errors import EvomergeError

FEWSHOT_SEED = 1234  # lm-eval's default few-shot seed, so prompts match a plain lm-eval run
# The order in which multi-fidelity rungs take a task's documents: one seeded permutation per task, the same
# for every candidate, so candidates at a rung are compared on the same documents.
RUNG_ORDER_SEED = 20250
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "num_beams")


def offline_defaults() -> None:
    """No model or dataset is fetched unless the caller opted in (HF_HUB_OFFLINE=0). Offline, the hub's
    progress bars would only be transformers' per-load "Loading weights" lines cluttering ours. Called by
    the command line, never on import or by a library object: a program using evomerge keeps its
    environment."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ["HF_HUB_OFFLINE"] == "1":
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@functools.lru_cache(maxsize=1)
def _live_hflm_class():
    """``HFLM`` that memoizes tokenization (prompts never change between candidates), decodes greedily
    with one fixed generation config, whatever ``generation_config.json`` each model came with, and never
    draws a progress bar of its own (the search draws one)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import GenerationConfig

    class LiveHFLM(HFLM):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._encoded: dict[tuple, list[int]] = {}
            self._batch_encoded: dict[tuple, tuple] = {}
            self._greedy = GenerationConfig(do_sample=False, num_beams=1,
                                            eos_token_id=self.tokenizer.eos_token_id,
                                            pad_token_id=self.tokenizer.pad_token_id,
                                            bos_token_id=self.tokenizer.bos_token_id)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
            key = (string, add_special_tokens, left_truncate_len)
            if key not in self._encoded:
                self._encoded[key] = super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            return list(self._encoded[key])

        def tok_batch_encode(self, strings: list[str], padding_side: str = "left",
                             left_truncate_len: int | None = None, truncation: bool = False):
            key = (tuple(strings), padding_side, left_truncate_len, truncation)
            if key not in self._batch_encoded:
                self._batch_encoded[key] = super().tok_batch_encode(strings, padding_side, left_truncate_len,
                                                                    truncation)
            return self._batch_encoded[key]

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            # ``loglikelihood_rolling`` asks for a progress bar per batch whatever its caller says: never one.
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

        def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
            for key in SAMPLING_KEYS:
                generation_kwargs.pop(key, None)
            own_config = self.model.generation_config
            self.model.generation_config = self._greedy
            try:
                return super()._model_generate(context, max_length, stop, do_sample=False, **generation_kwargs)
            finally:
                self.model.generation_config = own_config

    return LiveHFLM


# lm-eval HF-model arguments the evaluator sets itself, or that load a model (a live model is already loaded:
# its dtype is the search's ``dtype``, its revision part of the model's name, ``NAME@REVISION``).
OWN_MODEL_ARGS = {"pretrained": "the live model", "tokenizer": "the base's tokenizer", "batch_size": "batch_size",
                  "device": "device"}
LOADING_MODEL_ARGS = ("dtype", "revision", "trust_remote_code", "subfolder", "parallelize", "peft", "delta",
                      "autogptq", "gptqmodel", "gguf_file", "quantization_config", "backend")


def check_model_args(model_args: dict[str, Any]) -> dict[str, Any]:
    """The ``model_args`` lm-eval's HF model takes for a live model object; one line for any other."""
    import inspect

    from lm_eval.models.huggingface import HFLM

    accepted = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
    for key in model_args:
        if key in OWN_MODEL_ARGS:
            raise EvomergeError(f"model_args.{key}: set by evomerge from {OWN_MODEL_ARGS[key]}")
        if key in LOADING_MODEL_ARGS:
            raise EvomergeError(f"model_args.{key}: a loading option, for a model evomerge loads itself: use the "
                                "dtype field (search) or --dtype/--model-args of evomerge eval, and NAME@REVISION")
        if key not in accepted:
            raise EvomergeError(f"model_args.{key}: lm-eval's HF model has no such argument "
                                f"(it has: {', '.join(sorted(accepted - set(OWN_MODEL_ARGS)))})")
    return dict(model_args)


def rung_order(task: str, documents: int) -> list[int]:
    """The order in which multi-fidelity rungs take a task's documents (positions in document order)."""
    import random

    return random.Random(f"{RUNG_ORDER_SEED}:{task}").sample(range(documents), documents)


def check_limit(limit: int | float | None) -> None:
    """lm-eval's ``limit``: a whole number of documents >= 1, or a fraction in (0, 1). Anything else would
    be truncated (2.5 -> 2), fail deep inside lm-eval (0, negatives, NaN) or score nothing."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not math.isfinite(limit) or limit <= 0 \
            or (limit >= 1 and limit != int(limit)):
        raise EvomergeError(f"limit must be a whole number of documents >= 1 or a fraction in (0, 1), got {limit!r}")


@dataclass
class _Requests:
    """The weight-independent work for one tokenizer: request objects per type, documents per task."""

    tokenizer: Any
    by_type: dict[str, list]
    docs: dict[str, list[tuple[dict, list]]]  # task → (doc, its instances in order), in document order


class LmEvalEvaluator:
    """lm-eval tasks scored on a live model object; build once, call ``score`` per candidate.

    ``split`` picks the data split scored: ``search`` during the search, ``test`` for the final report, or any
    split the tasks' data has (e.g. ``validation`` of a standard lm-eval task); ``None`` scores each task's own
    ``test_split``. A task without that split is refused, naming the splits it has. ``metrics`` maps a task to the
    metrics to report, the first being the primary one; by default every metric the task produces, in the
    task's order. Generation is always greedy with the same settings for every model; ``gen_kwargs`` may change
    ``max_gen_toks`` or ``until`` but not sampling. ``threads`` sets torch's intra-op threads while scoring
    (``None`` leaves them): on a CPU shared with other busy processes, 1 thread avoids OpenMP threads
    spin-waiting on each other (benchmarks/eval_speed.py measures it).

    lm-eval's own options pass through unchanged: ``apply_chat_template``, ``fewshot_as_multiturn`` (default: as
    ``apply_chat_template``, which lm-eval requires for it), ``system_instruction``, ``limits`` (per task,
    over ``limit``) and ``model_args``, the keyword arguments of lm-eval's HF model (``max_length``,
    ``add_bos_token``…; see ``check_model_args`` for the ones a live model cannot take).
    """

    def __init__(self, tasks: list[str] | str, *, include_path: str | Path | None = None, split: str | None = "search",
                 limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 32,
                 apply_chat_template: bool = False, device: str = "cpu", gen_kwargs: dict[str, Any] | None = None,
                 metrics: dict[str, list[str]] | None = None, threads: int | None = None,
                 fewshot_as_multiturn: bool | None = None, system_instruction: str | None = None,
                 limits: dict[str, int | float] | None = None, model_args: dict[str, Any] | None = None,
                 backend: str = "hf", engine: dict[str, Any] | None = None) -> None:
        quiet_lm_eval()
        cache_prompt_templates()
        names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
        if not names or not all(names):
            raise EvomergeError(f"no task names given: {tasks!r}")
        if batch_size < 1:
            raise EvomergeError(f"batch_size must be >= 1, got {batch_size}")
        check_limit(limit)
        for value in (limits or {}).values():
            check_limit(value)
        if fewshot_as_multiturn and not apply_chat_template:
            raise EvomergeError("fewshot_as_multiturn needs apply_chat_template (the few-shot turns are chat turns)")
        if backend not in ("hf", "vllm"):
            raise EvomergeError(f"evaluator: {backend!r} is not a backend (hf or vllm)")
        self.backend = backend
        self.engine = dict(engine or {})  # vllm: the engine's pretrained directory, dtype and seed
        if backend == "vllm":
            from evaluators.vllm_backend import check_vllm

            check_vllm(device)
            if "pretrained" not in self.engine:
                raise EvomergeError("evaluator: vllm needs the base model's directory to build its engine from")
        self.model_args = check_model_args(model_args or {}) if backend == "hf" else dict(model_args or {})
        if num_fewshot is not None and num_fewshot < 0:
            raise EvomergeError(f"num_fewshot must be >= 0, got {num_fewshot}")
        if threads is not None and threads < 1:
            raise EvomergeError(f"threads must be >= 1, got {threads}")
        from merge_core.runtime import check_device  # here: importing evaluators stays free of torch

        check_device(device)
        include = Path(include_path) if include_path is not None else DEFAULT_INCLUDE_PATH
        if include_path is not None and not include.is_dir():
            raise EvomergeError(f"task include path {include} is not a directory")
        self.split = split
        self.limit = limit
        self.batch_size = batch_size
        self.apply_chat_template = apply_chat_template
        self.fewshot_as_multiturn = apply_chat_template if fewshot_as_multiturn is None else fewshot_as_multiturn
        self.system_instruction = system_instruction
        self.limits = dict(limits or {})
        self.device = device
        self.threads = threads
        self._tasks = build_tasks(names, include if include.is_dir() else None, split)
        self._configure(num_fewshot, gen_kwargs)
        self._metrics = self._select_metrics(metrics or {})
        unknown = [name for name in self.limits if name not in self._tasks]
        if unknown:
            raise EvomergeError(f"limits given for tasks not evaluated: {', '.join(unknown)}")
        self._lm = None
        self._engine = None
        self._requests: _Requests | None = None

    @property
    def tasks(self) -> dict[str, Any]:
        """The lm-eval ``Task`` objects, by name (groups expanded)."""
        return dict(self._tasks)

    @property
    def task_names(self) -> list[str]:
        return list(self._tasks)

    @property
    def metric_names(self) -> dict[str, list[str]]:
        """The metrics each task's scores will hold, by task name, known before anything is scored."""
        return {name: list(metrics) for name, metrics in self._metrics.items()}

    def _configure(self, num_fewshot: int | None, gen_kwargs: dict[str, Any] | None) -> None:
        """The overrides ``simple_evaluate`` applies, applied once."""
        gen_kwargs = dict(gen_kwargs or {})
        if gen_kwargs.get("do_sample") or gen_kwargs.get("num_beams", 1) != 1:
            raise EvomergeError("generation is greedy for every model scored; do_sample/num_beams cannot be set")
        for task in self._tasks.values():
            if task.get_config("output_type") == "generate_until":
                generation = dict(task.get_config("generation_kwargs") or {})
                generation.update(gen_kwargs)
                generation["do_sample"] = False
                for key in ("temperature", "top_p", "top_k"):
                    generation.pop(key, None)
                task.set_config("generation_kwargs", generation)
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config("num_fewshot", num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config("num_fewshot", 0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)

    def _select_metrics(self, wanted: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = [task for task in wanted if task not in self._tasks]
        if unknown:
            raise EvomergeError(f"metrics given for tasks not evaluated: {', '.join(unknown)}")
        selected = {}
        for name, task in self._tasks.items():
            produced = self._metric_names(task)
            chosen = list(wanted.get(name) or produced)
            missing = [m for m in chosen if m not in produced]
            if missing:
                raise EvomergeError(f"task {name!r} does not produce metric {', '.join(missing)} "
                                    f"(it produces: {', '.join(produced)})")
            selected[name] = chosen
        return selected

    @staticmethod
    def _metric_names(task: Any) -> list[str]:
        filters = filter_names(task)
        metrics = list(task.higher_is_better())
        return metrics if len(filters) == 1 else [f"{m},{f}" for f in filters for m in metrics]

    def score(self, model: Any, tokenizer: Any) -> Scores:
        """Score ``model`` as its weights are now; safe to call again after changing them in place."""
        import torch

        start = time.perf_counter()
        own_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or own_threads)
        try:
            lm = self._lm_for(model, tokenizer)
            requests = self._requests_for(lm, tokenizer)
            self._run(lm, requests)
        finally:
            torch.set_num_threads(own_threads)
        tasks = {name: self._task_score(name, requests.docs[name]) for name in self._tasks}
        return Scores(tasks=tasks, seconds=time.perf_counter() - start)

    def document_counts(self) -> dict[str, int]:
        """How many documents each task scores (after ``limit``), known without a model."""
        from lm_eval.evaluator_utils import get_sample_size

        return {name: len(list(task.doc_iterator(rank=0, world_size=1,
                                                 limit=get_sample_size(task, self.limits.get(name, self.limit)))))
                for name, task in self._tasks.items()}

    def score_rungs(self, model: Any, tokenizer: Any, rungs: list[int | None]) -> Iterator[Scores]:
        """Scores on growing, nested subsets of each task's documents (multi-fidelity): rung k covers
        ``min(rungs[k], documents)`` documents per task (None: all), the first ones of a seeded permutation
        that every candidate shares. Each document is scored once: a rung runs only the documents the one
        before it did not, and keeps the earlier responses, so a candidate that reaches the last rung costs
        what ``score`` costs and gets the same ``Scores`` (documents in document order). The caller stops
        iterating to prune the candidate; ``Scores.seconds`` is the time spent so far."""
        import torch

        start = time.perf_counter()
        own_threads = torch.get_num_threads()
        lm = self._lm_for(model, tokenizer)
        requests = self._requests_for(lm, tokenizer)
        self._clear(requests.by_type.values())
        orders = {name: rung_order(name, len(docs)) for name, docs in requests.docs.items()}
        scored = dict.fromkeys(orders, 0)  # per task: how many of its documents, in rung order, are scored
        for rung in rungs:
            by_type: dict[str, list] = defaultdict(list)
            for name, order in orders.items():
                upto = len(order) if rung is None else min(rung, len(order))
                for position in order[scored[name]:upto]:
                    for instance in requests.docs[name][position][1]:
                        by_type[instance.request_type].append(instance)
                scored[name] = max(scored[name], upto)
            torch.set_num_threads(self.threads or own_threads)
            try:
                self._run(lm, _Requests(tokenizer, dict(by_type), {}), clear=False)
            finally:
                torch.set_num_threads(own_threads)
            tasks = {name: self._task_score(name, [requests.docs[name][i] for i in sorted(order[:scored[name]])])
                     for name, order in orders.items()}
            yield Scores(tasks=tasks, seconds=time.perf_counter() - start)

    @staticmethod
    def _clear(groups) -> None:
        for instances in groups:
            for instance in instances:
                instance.resps.clear()
                instance.filtered_resps.clear()

    @classmethod
    def _run(cls, lm: Any, requests: _Requests, clear: bool = True) -> None:
        """Fresh responses for every request; lm-eval groups and batches them per request type."""
        import torch

        if clear:
            cls._clear(requests.by_type.values())
        with torch.inference_mode():
            for request_type, instances in requests.by_type.items():
                repeated = [inst for inst in instances for _ in range(inst.repeats)]
                for inst, response in zip(repeated, getattr(lm, request_type)(repeated, disable_tqdm=True),
                                          strict=True):
                    inst.resps.append(response)

    def _lm_for(self, model: Any, tokenizer: Any):
        ensure_on_device(model, self.device)
        if self.backend == "vllm":
            if self._engine is None:
                from evaluators.vllm_backend import VllmEngine

                self._engine = VllmEngine(self.engine["pretrained"], dtype=self.engine.get("dtype", "auto"),
                                          seed=self.engine.get("seed", 0), model_args=self.model_args)
            return self._engine.sync(model)  # the candidate's weights, pushed into the one engine
        if self._lm is not None and self._lm.model is model and self._lm.tokenizer is tokenizer:
            return self._lm
        self._lm = _live_hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size,
                                      **self.model_args)
        return self._lm

    def _requests_for(self, lm: Any, tokenizer: Any) -> _Requests:
        """Prompts, few-shot contexts and request objects: built once per tokenizer (chat templates use it)."""
        from lm_eval.evaluator_utils import get_sample_size

        if self._requests is not None and self._requests.tokenizer is tokenizer:
            return self._requests
        if self.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise EvomergeError("apply_chat_template: the model's tokenizer has no chat template "
                                "(tokenizer_config.json has no chat_template and there is no chat_template.jinja)")
        by_type: dict[str, list] = defaultdict(list)
        docs = {}
        for name, task in self._tasks.items():
            limit = get_sample_size(task, self.limits.get(name, self.limit))
            try:
                with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # lm-eval's tqdm bar
                    task.build_all_requests(limit=limit, rank=0, world_size=1, cache_requests=False,
                                            apply_chat_template=self.apply_chat_template,
                                            fewshot_as_multiturn=self.fewshot_as_multiturn,
                                            system_instruction=self.system_instruction,
                                            chat_template=lm.apply_chat_template if self.apply_chat_template
                                            else None,
                                            tokenizer_name=lm.tokenizer_name if self.apply_chat_template else "")
            except ValueError as exc:  # e.g. an empty split, more few-shot examples than the task's pool
                shots = task.get_config("num_fewshot")
                raise EvomergeError(f"task {name!r} ({self.split or 'default'} split, {shots} few-shot): cannot "
                                    f"build its requests: {exc}") from None
            per_doc = defaultdict(list)
            for instance in task.instances:
                by_type[instance.request_type].append(instance)
                per_doc[instance.doc_id].append(instance)
            docs[name] = [(doc, sorted(per_doc[doc_id], key=lambda inst: inst.idx))
                          for doc_id, doc in task.doc_iterator(rank=0, limit=limit, world_size=1)]
        self._requests = _Requests(tokenizer=tokenizer, by_type=dict(by_type), docs=docs)
        return self._requests

    def metric_directions(self) -> dict[str, dict[str, bool]]:
        """Per task, each reported metric's direction (True: higher is better), known before any scoring,
        so a config's objective can be checked without loading a model."""
        return {name: {key: self._higher_is_better(task, key.split(",")[0]) for key in self._metrics[name]}
                for name, task in self._tasks.items()}

    @staticmethod
    def _higher_is_better(task: Any, metric: str) -> bool:
        from lm_eval.api.registry import is_higher_better

        direction = task.higher_is_better().get(metric)
        return bool(is_higher_better(metric) if direction is None else direction)

    def _task_score(self, name: str, docs: list[tuple[dict, list]]) -> TaskScore:
        """lm-eval's filters, per-document ``process_results`` and aggregations, per-document values kept.

        (log-likelihood, units) pairs of corpus-level metrics (``loglikelihood_rolling`` tasks) are kept as
        ``samples`` and ``counts``; lm-eval's ``perplexity`` (per-document log-likelihoods, aggregated as
        exp(-mean)) as the same with one unit per document, so both bootstrap as ratios of sums."""
        from lm_eval.api.metrics import mean, perplexity

        task = self._tasks[name]
        apply_filters(task, [instance for _, instances in docs for instance in instances])
        filters = filter_names(task)
        per_doc: dict[str, list] = defaultdict(list)
        for filter_name in filters:
            for doc, instances in docs:
                results = task.process_results(doc, [inst.filtered_resps[filter_name] for inst in instances])
                for metric, value in results.items():
                    per_doc[metric if len(filters) == 1 else f"{metric},{filter_name}"].append(value)
        aggregations = task.aggregation()
        metrics, higher, samples, counts = {}, {}, {}, {}
        for key in self._metrics[name]:
            metric = key.split(",")[0]
            if key not in per_doc:
                raise EvomergeError(f"task {name!r} produced no {key!r} values (got: {', '.join(per_doc)})")
            values = per_doc[key]
            aggregation = aggregations.get(metric, mean)
            metrics[key] = float(aggregation(values))
            higher[key] = self._higher_is_better(task, metric)
            if all(isinstance(v, (numbers.Real, bool)) for v in values):
                samples[key] = [float(v) for v in values]
                if aggregation is perplexity:
                    counts[key] = [1.0] * len(values)
            elif all(isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, numbers.Real) for x in v)
                     for v in values):
                samples[key] = [float(ll) for ll, _ in values]
                counts[key] = [float(units) for _, units in values]
        return TaskScore(metrics=metrics, higher_is_better=higher, samples=samples, n=len(docs), counts=counts)
