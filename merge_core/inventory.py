"""What a model directory is, for a report's source inventory: architecture, parameter count, a weights hash."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["model_inventory", "weights_digest"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
READ_BYTES = 16 << 20


def weights_digest(path: Path) -> str:
    """SHA-256 over the weight files in name order (name and content), so two copies of one checkpoint hash
    alike and any changed byte changes it; config and tokenizer files are not weights."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(READ_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def model_inventory(path: str | Path) -> dict[str, Any]:
    """Architecture, model type, parameter count and weights hash of one model (or adapter) directory.
    What cannot be read is left out rather than failing: the inventory describes, it does not check."""
    from merge_core.checkpoint import CheckpointReader

    path = Path(path)
    out: dict[str, Any] = {"path": str(path)}
    for name in ("config.json", "adapter_config.json"):
        if (path / name).is_file():
            try:
                config = json.loads((path / name).read_text())
            except (OSError, ValueError):
                continue
            out["architecture"] = (config.get("architectures") or [config.get("peft_type", "?")])[0]
            out["model_type"] = config.get("model_type", config.get("peft_type", "?"))
            if "base_model_name_or_path" in config:
                out["adapter_of"] = config["base_model_name_or_path"]
            break
    try:
        reader = CheckpointReader(path)
        out["parameters"] = sum(math.prod(reader.shape(name)) for name in reader.names)
    except Exception:  # an adapter directory, or weights this reader cannot open
        pass
    try:
        out["sha256"] = weights_digest(path)
    except OSError:
        pass
    return out
