"""Checkpoints that hold everything needed to resume, with tensors in safetensors, never pickles.

Every file is written atomically (fedray.artifacts.atomic): a round checkpoint is a folder
written under a temporary name, fsynced and renamed into place, so a crash mid-write never
leaves a half checkpoint that looks complete. A state tree is one safetensors file whose
metadata holds the structure, so its two halves can never disagree.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from fedray.artifacts import atomic
from fedray.artifacts.atomic import WriteHook

ROUND_PREFIX = "round_"
STRUCTURE_KEY = "fedray.tree"

# What reading a torn or truncated checkpoint file raises.
UNREADABLE = (OSError, ValueError, KeyError, SafetensorError)


def _contiguous(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.require(v, requirements="C") for k, v in tensors.items()}


def save_weights(weights: dict[str, np.ndarray], path: Path, hook: WriteHook | None = None) -> None:
    atomic.write_bytes(Path(path), save(_contiguous(weights)), hook)


def load_weights(path: Path) -> OrderedDict:
    loaded = load_file(str(path))
    return OrderedDict(loaded.items())


def _encode(node: Any, tensors: dict[str, np.ndarray], where: str) -> Any:
    if isinstance(node, torch.Tensor):
        tensors[where] = node.detach().cpu().numpy()
        return {"__tensor__": where, "__torch__": True}
    if isinstance(node, np.ndarray):
        tensors[where] = node
        return {"__tensor__": where}
    if isinstance(node, dict):
        return {"__items__": [[_encode(k, tensors, f"{where}.k{i}"), _encode(v, tensors, f"{where}.{i}")]
                              for i, (k, v) in enumerate(node.items())]}
    if isinstance(node, (list, tuple)):
        return {"__list__": [_encode(v, tensors, f"{where}.{i}") for i, v in enumerate(node)],
                "__tuple__": isinstance(node, tuple)}
    if isinstance(node, (np.integer, np.floating)):
        return node.item()
    return node


def _decode(node: Any, tensors: dict[str, np.ndarray]) -> Any:
    if isinstance(node, dict):
        if "__tensor__" in node:
            arr = tensors[node["__tensor__"]]
            return torch.from_numpy(arr.copy()) if node.get("__torch__") else arr
        if "__items__" in node:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in node["__items__"]}
        if "__list__" in node:
            items = [_decode(v, tensors) for v in node["__list__"]]
            return tuple(items) if node.get("__tuple__") else items
    return node


def save_tree(tree: Any, path: Path, hook: WriteHook | None = None) -> Path:
    """Any nest of dicts/lists/scalars/tensors (an optimizer or accountant state) to one
    safetensors file, `path` with the suffix .safetensors, the structure in its metadata."""
    tensors: dict[str, np.ndarray] = {}
    structure = _encode(tree, tensors, "t")
    out = Path(path).with_suffix(".safetensors")
    atomic.write_bytes(out, save(_contiguous(tensors),
                                 metadata={STRUCTURE_KEY: json.dumps(structure)}), hook)
    return out


def load_tree(path: Path) -> Any:
    """The tree save_tree wrote; raises one of UNREADABLE for a torn or missing file."""
    file = Path(path).with_suffix(".safetensors")
    with safe_open(str(file), framework="numpy") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(file))
    if STRUCTURE_KEY in metadata:
        return _decode(json.loads(metadata[STRUCTURE_KEY]), tensors)
    # Written before the structure moved into the metadata: it sits beside, as JSON.
    return _decode(json.loads(file.with_suffix(".json").read_text()), tensors)


def round_dir(checkpoints: Path, round_number: int) -> Path:
    return checkpoints / f"{ROUND_PREFIX}{round_number:04d}"


def save_round(checkpoints: Path, round_number: int, weights: dict[str, np.ndarray],
               state: dict[str, Any], keep: int = 2, protect: int | None = None,
               trees: dict[str, Any] | None = None, hook: WriteHook | None = None) -> Path:
    """Write round N's global weights and state atomically; prune older rounds but `protect`.

    `trees` are array-holding states (a server optimizer's moments) saved with save_tree.
    `hook` runs before each file of the checkpoint is renamed into place (fault injection).
    """
    final = round_dir(checkpoints, round_number)
    tmp = checkpoints / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(weights, tmp / "global.safetensors", hook)
    for name, tree in (trees or {}).items():
        save_tree(tree, tmp / name, hook)
    atomic.write_json(tmp / "state.json", state, hook, indent=1)
    atomic.fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic.fsync_dir(checkpoints)
    for old in completed_rounds(checkpoints)[:-keep]:
        if old == protect:
            continue
        shutil.rmtree(round_dir(checkpoints, old), ignore_errors=True)
    return final


def completed_rounds(checkpoints: Path) -> list[int]:
    if not checkpoints.is_dir():
        return []
    rounds = []
    for child in checkpoints.iterdir():
        if child.name.startswith(ROUND_PREFIX) and (child / "state.json").is_file():
            rounds.append(int(child.name[len(ROUND_PREFIX):]))
    return sorted(rounds)


def load_round(checkpoints: Path, round_number: int) -> tuple[OrderedDict, dict[str, Any]]:
    """Round N's weights and state; raises one of UNREADABLE when a file is torn or missing."""
    folder = round_dir(checkpoints, round_number)
    return load_weights(folder / "global.safetensors"), json.loads((folder / "state.json").read_text())


def load_round_tree(checkpoints: Path, round_number: int, name: str) -> Any:
    return load_tree(round_dir(checkpoints, round_number) / name)
