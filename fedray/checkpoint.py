"""Checkpoints that hold everything needed to resume, with tensors in safetensors, never pickles.

A round checkpoint is a folder written under a temporary name and renamed into place, so a
crash mid-write never leaves a half checkpoint that looks complete.
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
from safetensors.numpy import load_file, save_file

ROUND_PREFIX = "round_"


def save_weights(weights: dict[str, np.ndarray], path: Path) -> None:
    save_file({k: np.require(v, requirements="C") for k, v in weights.items()}, str(path))


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


def save_tree(tree: Any, path: Path) -> None:
    """Any nest of dicts/lists/scalars/tensors (an optimizer or accountant state) to two files."""
    tensors: dict[str, np.ndarray] = {}
    structure = _encode(tree, tensors, "t")
    save_file({k: np.require(v, requirements="C") for k, v in tensors.items()}, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(structure))


def load_tree(path: Path) -> Any:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    return _decode(json.loads(path.with_suffix(".json").read_text()), tensors)


def round_dir(checkpoints: Path, round_number: int) -> Path:
    return checkpoints / f"{ROUND_PREFIX}{round_number:04d}"


def save_round(checkpoints: Path, round_number: int, weights: dict[str, np.ndarray],
               state: dict[str, Any], keep: int = 2, protect: int | None = None,
               trees: dict[str, Any] | None = None) -> Path:
    """Write round N's global weights and state atomically; prune older rounds but `protect`.

    `trees` are array-holding states (a server optimizer's moments) saved with save_tree.
    """
    final = round_dir(checkpoints, round_number)
    tmp = checkpoints / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(weights, tmp / "global.safetensors")
    for name, tree in (trees or {}).items():
        save_tree(tree, tmp / name)
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
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
    folder = round_dir(checkpoints, round_number)
    return load_weights(folder / "global.safetensors"), json.loads((folder / "state.json").read_text())


def load_round_tree(checkpoints: Path, round_number: int, name: str) -> Any:
    return load_tree(round_dir(checkpoints, round_number) / name)
