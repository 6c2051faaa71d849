"""Save and load a tree of Python values and tensors without pickle: JSON for the tree, safetensors for the tensors.

A strategy's state, the RNG states and an in-stage checkpoint are nested dicts, lists and tuples
of numbers, strings and tensors. ``torch.save`` would pickle them, and loading a pickle runs
whatever code it names, so a run folder from someone else could execute code on load. Here the
tree goes to ``state.json``, every tensor to ``tensors.safetensors``, and the tree refers to a
tensor by its key there::

    {"state": {0: {"exp_avg": <tensor>}}, "betas": (0.9, 0.999)}
    -> state.json: {"state": {"__items__": [[0, {"exp_avg": {"__tensor__": "0"}}]]},
                    "betas": {"__tuple__": [0.9, 0.999]}}

A dict whose keys are not all strings is written as its ``[key, value]`` pairs, so int keys (an
optimizer's parameter ids) come back as ints; tuples come back as tuples (``random.setstate``
wants one); NaN and ±inf as ``{"__float__": "nan"}``, so the file stays strict JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from continual_ft.errors import ContinualFTError
from continual_ft.files import atomic_dir

__all__ = ["save_tree", "load_tree", "STATE_FILE", "TENSORS_FILE"]

STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
_FORMAT = "continual-ft state tree 1"
_MARKERS = ("__tensor__", "__tuple__", "__items__", "__float__")


def _encode(obj, tensors: dict[str, torch.Tensor], where: str):
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}  # 'nan', 'inf', '-inf'
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        # A copy of its own: safetensors refuses views and tensors that share storage.
        tensors[key] = obj.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, tensors, f"{where} key {k!r}"), _encode(v, tensors, f"{where}[{k!r}]")]
                for k, v in obj.items()
            ]
        }
    raise TypeError(f"save_tree: cannot store {type(obj).__name__} at {where}")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and next(iter(obj)) in _MARKERS:
        marker, value = next(iter(obj.items()))
        if marker == "__tensor__":
            if value not in tensors:
                raise ValueError(f"refers to tensor {value!r}, which {TENSORS_FILE} does not hold")
            return tensors[value]
        if marker == "__float__":
            if value not in ("nan", "inf", "-inf"):
                raise ValueError(f"bad float {value!r}")
            return float(value)
        if not isinstance(value, list):
            raise ValueError(f"{marker} needs a list")
        if marker == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}  # __items__: [key, value] pairs
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(directory: Path, obj) -> None:
    """Write ``obj`` to ``directory/state.json`` and ``directory/tensors.safetensors``, replacing the folder atomically.

    ``obj`` nests dicts (keys: str, int, or any other value of this list that is hashable), lists,
    tuples, ``None``, bools, ints, floats (NaN and inf included), strings and tensors (any device,
    dtype and layout; each is saved as a contiguous CPU copy of its own, so views and tensors that
    share storage are fine). Anything else raises ``TypeError`` before a file is written.
    """
    tensors: dict[str, torch.Tensor] = {}
    tree = {"format": _FORMAT, "tree": _encode(obj, tensors, "the root")}
    text = json.dumps(tree, indent=1, allow_nan=False) + "\n"
    with atomic_dir(Path(directory)) as tmp:
        (tmp / STATE_FILE).write_text(text, encoding="utf-8")
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt"})


def load_tree(directory: Path, device: str | torch.device = "cpu"):
    """The tree :func:`save_tree` wrote, its tensors on ``device``. Nothing is unpickled.

    A missing or garbled file raises :class:`ContinualFTError` naming it. Other files in the
    folder (a stray ``state.pt``, say) are never read.
    """
    directory = Path(directory)
    state_path, tensors_path = directory / STATE_FILE, directory / TENSORS_FILE
    for path in (state_path, tensors_path):
        if not path.is_file():
            raise ContinualFTError(f"{path}: missing (not a saved state folder, or an interrupted save)")
    try:
        tree = json.loads(state_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ContinualFTError(f"{state_path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict) or tree.get("format") != _FORMAT or "tree" not in tree:
        raise ContinualFTError(f"{state_path}: not a continual-ft state file (no format {_FORMAT!r})")
    try:
        tensors = load_file(str(tensors_path), device=str(torch.device(device)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ContinualFTError(f"{tensors_path}: not a readable safetensors file ({msg})") from None
    try:
        return _decode(tree["tree"], tensors)
    except (ValueError, TypeError) as e:  # TypeError: an unhashable key, or pairs that are not pairs
        raise ContinualFTError(f"{state_path}: malformed state tree ({e})") from None
