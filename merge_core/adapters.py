"""LoRA adapters as merge sources: ``base + adapter`` read like one more model, never written out dense.

A PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) is a few megabytes of
factors ``A`` (r × in) and ``B`` (out × r) per targeted module. ``LoraSource`` presents base + adapter with
the base's names, shapes, dtypes and config, and computes a tensor only when the engine asks for it:
``W + B @ A · scale`` (transposed for ``fan_in_fan_out``), rounded to ``W``'s dtype, which is what PEFT's
``merge_and_unload`` stores and what mergekit then merges. Planning and the merge methods see an ordinary
model whose task vector against the base is ``B @ A · scale``; host memory holds the factors only.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from merge_core.checkpoint import (
    PICKLE_FILE,
    PICKLE_INDEX,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    CheckpointReader,
    resolve_model_path,
)
from merge_core.errors import EvomergeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
MODEL_WEIGHTS = (SAFETENSORS_FILE, SAFETENSORS_INDEX, PICKLE_FILE, PICKLE_INDEX)

_PREFIX = "base_model.model."
_FACTOR = re.compile(r"(?P<module>.+)\.(?P<factor>lora_[AB])(?:\.[^.]+)?\.(?P<param>weight|bias)")
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")

# adapter_config.json fields that change what merging the adapter means, beyond A, B and the scale. Each
# is refused by name when set, so an adapter never merges to something PEFT would not have produced.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales each merged column by a learned magnitude",
    "layer_replication": "it duplicates base layers",
    "target_parameters": "it adapts raw parameters (e.g. MoE experts), not modules",
    "trainable_token_indices": "it trains single embedding rows",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens and cannot be merged",
    "use_qalora": "QA-LoRA's factors act on pooled inputs",
}


# --------------------------------------------------------------------------------------------- references


def split_ref(ref: str, recipe_dir: Path | None = None) -> tuple[str, str | None]:
    """(model, adapter) of mergekit's ``MODEL+ADAPTER`` syntax, else (ref, None). A directory whose own
    name holds a ``+`` is a model, as it is; mergekit splits on the one ``+`` and so does this."""
    if "+" not in ref or any(p is not None and p.is_dir() for p in (Path(ref), recipe_dir and recipe_dir / ref)):
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise EvomergeError(f"model {ref}: expected MODEL+ADAPTER with one '+' (as mergekit reads it)")
    return parts[0], parts[1]


def resolve_source(ref: str, recipe_dir: Path | None = None) -> str:
    """``ref`` as absolute paths: a model or adapter directory, or ``MODEL_PATH+ADAPTER_PATH``."""
    model, adapter = split_ref(ref, recipe_dir)
    resolved = str(resolve_model_path(model, recipe_dir))
    return resolved if adapter is None else f"{resolved}+{resolve_model_path(adapter, recipe_dir)}"


def is_adapter(path: Path) -> bool:
    """A PEFT adapter directory: an adapter config and no model weights (a copy of the base's
    ``config.json`` beside the adapter, as some trainers leave, does not make it a model)."""
    return (path / ADAPTER_CONFIG).is_file() and not any((path / name).is_file() for name in MODEL_WEIGHTS)


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LoraFactors:
    """One module's low-rank update: ``B @ A · scale``, transposed where the module stores (in, out)."""

    a: Tensor
    b: Tensor
    scale: float
    transpose: bool

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.b.shape[0], self.a.shape[1]
        return (cols, rows) if self.transpose else (rows, cols)

    def delta(self, dtype: torch.dtype, device: str | torch.device) -> Tensor:
        """The update in ``dtype``, computed as PEFT computes it (product first, then the scale)."""
        product = self.b.to(device=device, dtype=dtype) @ self.a.to(device=device, dtype=dtype)
        if self.transpose:
            product = product.T.contiguous()
        return product.mul_(self.scale)


@dataclass
class LoraAdapter:
    """An adapter directory read into memory: factors per base weight, and tensors it replaces outright
    (``modules_to_save``, trained biases); ``bias_updates`` are ``lora_B.bias · scale`` (``lora_bias``)."""

    path: Path
    base_model: str | None
    factors: dict[str, LoraFactors] = field(default_factory=dict)
    replacements: dict[str, Tensor] = field(default_factory=dict)
    bias_updates: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | os.PathLike, *, allow_pickle: bool = False) -> "LoraAdapter":
        path = Path(path)
        config = _read_adapter_config(path)
        tensors = _read_adapter_tensors(path, allow_pickle)
        adapter = cls(path, config.get("base_model_name_or_path") or None)
        pairs: dict[str, dict[str, Tensor]] = {}
        for key, tensor in tensors.items():
            name = key.removeprefix(_PREFIX)
            _refuse_unsupported_tensor(path, key)
            match = _FACTOR.fullmatch(name)
            if match is None:
                adapter.replacements[_SAVED_COPY.sub(".", name)] = tensor
            elif match["param"] == "bias":
                if match["factor"] != "lora_B":
                    raise EvomergeError(f"adapter {path}: unexpected tensor {key!r}")
                pairs.setdefault(match["module"], {})["bias"] = tensor
            else:
                pairs.setdefault(match["module"], {})[match["factor"]] = tensor
        for module, found in pairs.items():
            if "lora_A" not in found or "lora_B" not in found:
                missing = "lora_A" if "lora_A" not in found else "lora_B"
                raise EvomergeError(f"adapter {path}: module {module} has no {missing} weight")
            scale = _scale(path, config, module, found["lora_A"], found["lora_B"])
            adapter.factors[f"{module}.weight"] = LoraFactors(found["lora_A"], found["lora_B"], scale,
                                                              bool(config.get("fan_in_fan_out")))
            if "bias" in found:
                adapter.bias_updates[f"{module}.bias"] = found["bias"].float() * scale
        return adapter

    def moved(self, dtype: torch.dtype | None, device: str | torch.device) -> "LoraAdapter":
        """The same adapter with replacements in ``dtype`` and everything on ``device`` (for a search)."""
        factors = {n: LoraFactors(f.a.to(device), f.b.to(device), f.scale, f.transpose)
                   for n, f in self.factors.items()}
        replacements = {n: t.to(device=device, dtype=dtype or t.dtype) for n, t in self.replacements.items()}
        return LoraAdapter(self.path, self.base_model, factors, replacements,
                           {n: t.to(device) for n, t in self.bias_updates.items()})


def _read_adapter_config(path: Path) -> dict:
    if not path.is_dir():
        raise EvomergeError(f"adapter {path}: directory not found")
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise EvomergeError(f"adapter {path}: {ADAPTER_CONFIG} not found") from None
    except (OSError, ValueError) as exc:
        raise EvomergeError(f"adapter {path}: {ADAPTER_CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise EvomergeError(f"adapter {path}: {ADAPTER_CONFIG} is not a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise EvomergeError(f"adapter {path}: peft_type {kind!r} is not supported (only LORA adapters merge)")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise EvomergeError(f"adapter {path}: {key}: {config[key]!r} is not supported ({why})")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise EvomergeError(f"adapter {path}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise EvomergeError(f"adapter {path}: {key} must be a mapping, got {config[key]!r}")
    return config


def _read_adapter_tensors(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    file = path / ADAPTER_WEIGHTS
    if not file.is_file() and (path / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise EvomergeError(f"adapter {path}: weights are pickled ({ADAPTER_PICKLE}), which can run code; "
                                f"pass --allow-pickle to load them with torch.load(weights_only=True)")
        try:
            return torch.load(path / ADAPTER_PICKLE, map_location="cpu", weights_only=True)
        except Exception as exc:  # many types for bad pickles; the user needs one line
            raise EvomergeError(f"adapter {path}: cannot load {ADAPTER_PICKLE} safely: "
                                f"{type(exc).__name__}") from None
    if not file.is_file():
        raise EvomergeError(f"adapter {path}: {ADAPTER_WEIGHTS} not found")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise EvomergeError(f"adapter {path}: {ADAPTER_WEIGHTS} is not a readable safetensors file "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _refuse_unsupported_tensor(path: Path, key: str) -> None:
    if "lora_embedding_" in key:
        raise EvomergeError(f"adapter {path}: embedding LoRA ({key}) is not supported; "
                            f"train the embedding with modules_to_save instead")
    if "lora_magnitude_vector" in key:
        raise EvomergeError(f"adapter {path}: use_dora: DoRA ({key}) is not supported")
    if "trainable_tokens" in key:
        raise EvomergeError(f"adapter {path}: trainable_token_indices ({key}) is not supported")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: the first pattern key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(path: Path, config: dict, module: str, a: Tensor, b: Tensor) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), each overridable per module by the patterns."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise EvomergeError(f"adapter {path}: module {module}: lora_A {list(a.shape)} and lora_B "
                            f"{list(b.shape)} do not have rank r={rank} (r / rank_pattern)")
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# --------------------------------------------------------------------------------------------- source


class LoraSource:
    """``base`` with ``adapter`` applied, as a merge source: the base's names, shapes, dtypes and config;
    tensors computed on demand. ``path`` is the base's (its tokenizer and generation config are the model's)."""

    def __init__(self, base, adapter: LoraAdapter, ref: str):
        self.base = base
        self.adapter = adapter
        self.ref = ref
        self.config = base.config
        self.path = base.path
        self._check_fits()

    def __repr__(self) -> str:
        return f"LoraSource({str(self.path)!r} + {str(self.adapter.path)!r})"

    def _check_fits(self) -> None:
        """Every tensor the adapter touches is one of the base's, of the same shape (else the adapter was
        trained on another architecture or size)."""
        touched = [(n, f.shape) for n, f in self.adapter.factors.items()]
        touched += [(n, tuple(t.shape)) for n, t in {**self.adapter.replacements, **self.adapter.bias_updates}.items()]
        names = set(self.base.names)
        for name, shape in touched:
            if name not in names:
                raise EvomergeError(f"model {self.ref}: the adapter changes {name}, which the base "
                                    f"{self.base.path} does not have")
            if tuple(self.base.shape(name)) != tuple(shape):
                raise EvomergeError(f"model {self.ref}: the adapter's {name} is {list(shape)} but "
                                    f"{list(self.base.shape(name))} in the base {self.base.path}")

    @property
    def names(self) -> list[str]:
        return self.base.names

    def has(self, name: str) -> bool:
        return name in self.base.names

    __contains__ = has

    def shape(self, name: str):
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Tensor:
        """The tensor as PEFT's merge leaves it in the base's dtype (the update added in at least float32,
        then rounded once), then cast to ``dtype``."""
        stored = self.base.dtype(name)
        if name in self.adapter.replacements:
            merged = self.adapter.replacements[name].to(device=device, dtype=stored)
        elif name in self.adapter.factors or name in self.adapter.bias_updates:
            weight = self.base.get(name, device=device)
            wide = torch.promote_types(weight.dtype, torch.float32)
            if name in self.adapter.factors:
                update = self.adapter.factors[name].delta(wide, device)
            else:
                update = self.adapter.bias_updates[name].to(device=device, dtype=wide, copy=True)
            merged = update.add_(weight.to(wide)).to(stored)  # the update is this call's own: added into
        else:
            return self.base.get(name, dtype=dtype, device=device)
        return merged.to(dtype=dtype or stored)

    def with_base(self, base, dtype: torch.dtype | None, device: str | torch.device) -> "LoraSource":
        """This adapter over another copy of the base (the one a search holds in memory)."""
        return LoraSource(base, self.adapter.moved(dtype, device), self.ref)


# --------------------------------------------------------------------------------------------- opening


def _hub_id(path: Path) -> str | None:
    """The hub id of a model directory that is a snapshot in the HF cache (``models--ORG--NAME/…``)."""
    cached = next((p.name for p in path.parents if p.name.startswith("models--")), None)
    return cached.removeprefix("models--").replace("--", "/", 1) if cached else None


def check_adapter_base(adapter: LoraAdapter, adapter_ref: str, base_ref: str, base_path: Path) -> None:
    """An adapter names the model it was trained on; when that can be compared with the base it is applied
    to here (both local directories, or a hub id and a base read from the hub), they must be the same model."""
    declared = adapter.base_model
    if not declared:
        return
    hub = _hub_id(base_path)
    declared_dir = Path(declared).expanduser()
    if declared_dir.is_dir() and hub is None:
        same = declared_dir.resolve() == base_path.resolve()
    elif declared.count("/") == 1 and not declared.startswith((".", "/", "~")) and hub is not None:
        same = declared.rsplit("@", 1)[0] == hub
    else:
        return  # a path of another machine, or a hub id against a local directory: nothing to compare
    if not same:
        raise EvomergeError(f"model {adapter_ref}: the adapter was trained on {declared} "
                            f"(its base_model_name_or_path), but its base here is {base_ref}")


class SourceOpener:
    """Opens recipe references as sources, each directory once: a model directory is a
    ``CheckpointReader``; ``MODEL+ADAPTER``, or an adapter directory alone over ``base_ref`` (the recipe's
    base_model), is a ``LoraSource`` sharing that model's reader."""

    def __init__(self, recipe_dir: Path | None = None, *, allow_pickle: bool = False):
        self.recipe_dir = recipe_dir
        self.allow_pickle = allow_pickle
        self._readers: dict[Path, CheckpointReader] = {}
        self._adapters: dict[Path, LoraAdapter] = {}

    def open(self, ref: str, base_ref: str | None = None):
        model_ref, adapter_ref = split_ref(ref, self.recipe_dir)
        model_path = resolve_model_path(model_ref, self.recipe_dir)
        if adapter_ref is None and not is_adapter(model_path):
            return self.reader(model_path)
        if adapter_ref is None:
            adapter_ref, adapter_path = ref, model_path
            if base_ref is None or base_ref == ref:
                raise EvomergeError(f"model {ref}: a LoRA adapter needs a base model: give the recipe a "
                                    f"base_model, or write the model as BASE+{ref}")
            model_ref, base_adapter = split_ref(base_ref, self.recipe_dir)
            model_path = resolve_model_path(model_ref, self.recipe_dir)
            if base_adapter is not None or is_adapter(model_path):
                raise EvomergeError(f"model {ref}: its base_model {base_ref} is itself an adapter; "
                                    f"write the model as BASE+{ref}")
        else:
            adapter_path = resolve_model_path(adapter_ref, self.recipe_dir)
            if not (adapter_path / ADAPTER_CONFIG).is_file():
                raise EvomergeError(f"model {ref}: {adapter_path} is not a LoRA adapter ({ADAPTER_CONFIG} not found)")
        adapter = self.adapter(adapter_path)
        check_adapter_base(adapter, ref, model_ref, model_path)
        return LoraSource(self.reader(model_path), adapter, ref)

    def reader(self, path: Path) -> CheckpointReader:
        if path not in self._readers:
            self._readers[path] = CheckpointReader(path, allow_pickle=self.allow_pickle)
        return self._readers[path]

    def adapter(self, path: Path) -> LoraAdapter:
        if path not in self._adapters:
            self._adapters[path] = LoraAdapter.read(path, allow_pickle=self.allow_pickle)
        return self._adapters[path]
