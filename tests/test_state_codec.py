"""The pickle-free state codec: trees of values and tensors through JSON + safetensors, bitwise and safely."""

import json
import math
import os
import pickle
import random
import stat
from pathlib import Path

import pytest
import torch

from continual_ft import state_codec as _state
from continual_ft.errors import ContinualFTError
from continual_ft.state_codec import load_tree, save_tree


def same(a, b) -> bool:
    """Equal in value and type (tuple is not list), tensors bit for bit, NaN equal to NaN, -0.0 not 0.0."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or (a.dtype, a.shape, a.device) != (b.dtype, b.shape, b.device):
            return False
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(type(k) is type(j) for k, j in zip(a, b)) and all(same(a[k], b[k]) for k in a)
    return a == b


def tree():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    base[0, 0] = float("nan")
    return {
        "float32": base,
        "transposed": base.t(),  # a non-contiguous view
        "row": base[1],  # shares storage with "float32"
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(7, generator=g).half(),
        "float64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "uint8": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
        "int64": torch.tensor([-(2**62), 0, 2**62]),
        "int32": torch.arange(5, dtype=torch.int32),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "grad": torch.ones(2, requires_grad=True) * 2,
        "values": [1, -0.0, 2.5, float("nan"), float("inf"), float("-inf"), 10**30, True, None, "ü ✓"],
        "nested": ({"a": (1, (2, None))}, [torch.ones(1)], ()),
        "int_keys": {0: {"step": torch.tensor(2.0)}, 3: "three"},
        "mixed_keys": {1: "one", "1": "string one", (2, "b"): [], None: 0, 2.5: "f"},
        "looks_like_a_marker": {"__tensor__": "0", "__tuple__": [1]},
        "empty_containers": [{}, [], ()],
    }


def test_nested_structure_round_trips_bitwise(tmp_path):
    obj = tree()
    save_tree(tmp_path / "state", obj)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["state.json", "tensors.safetensors"]
    loaded = load_tree(tmp_path / "state")
    assert same(loaded, obj)
    assert loaded["row"].data_ptr() != loaded["float32"].data_ptr() and not loaded["grad"].requires_grad
    text = (tmp_path / "state" / "state.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))  # strict JSON


def test_adamw_state_round_trip_resumes_bitwise(tmp_path):
    def setup(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 3)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)

    def step(model, optimizer, i):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()

    model, optimizer = setup(0)
    for i in range(2):
        step(model, optimizer, i)
    save_tree(tmp_path / "ckpt", {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    step(model, optimizer, 2)  # the uninterrupted run

    resumed, resumed_optimizer = setup(1)  # other weights, empty optimizer state: all comes from the files
    state = load_tree(tmp_path / "ckpt")
    assert sorted(state["optimizer"]["state"]) == [0, 1]  # int parameter ids stay ints
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    resumed.load_state_dict(state["model"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    step(resumed, resumed_optimizer, 2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert same(resumed_optimizer.state_dict(), optimizer.state_dict())


def test_rng_states_round_trip(tmp_path):
    random.seed(5)
    torch.manual_seed(5)
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    save_tree(tmp_path / "rng", states)
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    loaded = load_tree(tmp_path / "rng")
    assert loaded["python"] == states["python"] and isinstance(loaded["python"][1], tuple)
    random.setstate(loaded["python"])  # needs a tuple holding a tuple
    torch.set_rng_state(loaded["torch"])
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


class Plant:
    """A pickle that, when loaded, creates ``marker``: what a malicious ``state.pt`` could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_is_never_executed(tmp_path, monkeypatch):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Plant(control)))
    assert control.exists()  # the plant is live: unpickling it would create the marker

    marker = tmp_path / "executed"
    folder = tmp_path / "state"
    save_tree(folder, {"w": torch.ones(2)})
    torch.save({"w": Plant(marker)}, folder / "state.pt")  # a stray pickle beside the real files is ignored

    def never(*args, **kwargs):
        raise AssertionError("load_tree unpickled something")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, never)
    assert torch.equal(load_tree(folder)["w"], torch.ones(2))

    monkeypatch.undo()
    for payload in (pickle.dumps(Plant(marker)), (folder / "state.pt").read_bytes()):  # raw pickle, torch.save zip
        (folder / "tensors.safetensors").write_bytes(payload)
        with pytest.raises(ContinualFTError, match=r"tensors\.safetensors: not a readable safetensors file") as e:
            load_tree(folder)
        assert "\n" not in str(e.value)
    (folder / "state.json").write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(ContinualFTError, match=r"state\.json: not valid JSON"):
        load_tree(folder)
    assert not marker.exists()


def test_missing_or_garbled_files_are_one_line_naming_the_file(tmp_path):
    folder = tmp_path / "state"
    with pytest.raises(ContinualFTError, match=r"state[/\\]state\.json: missing"):
        load_tree(folder)
    save_tree(folder, {"w": torch.ones(2), "n": 1})
    (folder / "tensors.safetensors").unlink()
    with pytest.raises(ContinualFTError, match=r"tensors\.safetensors: missing"):
        load_tree(folder)
    save_tree(folder, {"w": torch.ones(2)})
    state = folder / "state.json"
    header = {"format": json.loads(state.read_text())["format"]}
    cases = {
        "{oops": r"state\.json: not valid JSON",
        '{"tree": 1}': r"state\.json: not a continual-ft state file",
        json.dumps(header | {"tree": {"w": {"__tensor__": "7"}}}): r"state\.json: malformed state tree.*tensor '7'",
        json.dumps(header | {"tree": {"__items__": 5}}): r"state\.json: malformed state tree",
        json.dumps(header | {"tree": {"__items__": [[[1], 2]]}}): r"state\.json: malformed state tree",  # list key
    }
    for text, match in cases.items():
        state.write_text(text)
        with pytest.raises(ContinualFTError, match=match) as e:
            load_tree(folder)
        assert "\n" not in str(e.value)


def test_save_replaces_the_folder_atomically_with_umask_permissions(tmp_path, monkeypatch):
    old_mask = os.umask(0o022)
    try:
        save_tree(tmp_path / "state", {"v": 1, "w": torch.zeros(3)})
        folder = tmp_path / "state"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in folder.iterdir())
    finally:
        os.umask(old_mask)

    with pytest.raises(TypeError, match=r"cannot store set at the root\['v'\]\[0\]"):
        save_tree(folder, {"v": [{1}]})

    def killed(tensors, path, metadata=None):  # dies half way through writing the tensors
        Path(path).write_bytes(b"\x00" * 3)
        raise KeyboardInterrupt

    monkeypatch.setattr(_state, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_tree(folder, {"v": 2, "w": torch.ones(3)})
    loaded = load_tree(folder)  # the last complete save, untouched
    assert loaded["v"] == 1 and torch.equal(loaded["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state"]  # no half-written sibling left behind

    monkeypatch.undo()
    save_tree(folder, {"v": 3})
    assert load_tree(folder) == {"v": 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_tensors_save_and_load_onto_a_device(tmp_path):
    obj = {"w": torch.randn(3, 4, device="cuda").t(), "rng": torch.cuda.get_rng_state_all()}
    save_tree(tmp_path / "state", obj)
    loaded = load_tree(tmp_path / "state", device="cuda")
    assert loaded["w"].device.type == "cuda" and torch.equal(loaded["w"], obj["w"])
    assert same(load_tree(tmp_path / "state")["rng"], [s.cpu() for s in obj["rng"]])
