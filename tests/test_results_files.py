"""Run files follow the umask (as plain open()/mkdir() would), and atomic folders replace all or nothing."""

import os
import stat
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest

from continual_ft.config import LoraConfig
from continual_ft.eval.predictions import write_row
from continual_ft.files import atomic_dir, atomic_write, umask, write_json
from continual_ft.model import loading as models
from continual_ft.model.adapters import save_stage, start_stage
from continual_ft.report.plots import save_figure


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def write_private(path) -> None:
    """Write a file 0600, as safetensors (0.8) does."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


@pytest.fixture(params=[0o022, 0o027])
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_umask_is_read_without_changing_it(mask):
    assert umask() == mask
    assert umask() == mask


def test_written_files_and_figures_follow_the_umask(tmp_path, mask):
    atomic_write(tmp_path / "config.yaml", "a: 1\n")
    write_json(tmp_path / "results.json", {"R": {}})
    save_figure(plt.figure(), tmp_path / "forgetting_matrix.png")
    for name in ("config.yaml", "results.json", "forgetting_matrix.png"):
        assert mode(tmp_path / name) == 0o666 & ~mask, name
    assert mode(tmp_path / "results.json") == (0o644 if mask == 0o022 else 0o640)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "forgetting_matrix.png", "results.json"]
    row = write_row(tmp_path, 0, {"colors": [{"gold": 0, "chosen": 1, "loglik": [-1.0, -0.5], "answer": "red"}]})
    assert mode(row) == 0o666 & ~mask and mode(row.parent) == 0o777 & ~mask


def test_atomic_dir_follows_the_umask(tmp_path, mask):
    with atomic_dir(tmp_path / "state") as tmp:
        (tmp / "f.txt").write_text("x")
        (tmp / "sub").mkdir(mode=0o700)
        write_private(tmp / "sub" / "tensors.safetensors")
    assert mode(tmp_path / "state") == 0o777 & ~mask
    assert mode(tmp_path / "state") == (0o755 if mask == 0o022 else 0o750)
    assert mode(tmp_path / "state" / "sub") == 0o777 & ~mask
    for f in ("f.txt", "sub/tensors.safetensors"):
        assert mode(tmp_path / "state" / f) == 0o666 & ~mask, f


def test_saved_adapter_folder_follows_the_umask(tmp_path, mask):
    model, _ = models.load_model("tiny", seed=0)
    out = save_stage(start_stage(model, "continue", 0, LoraConfig(r=2)), "continue", 0, tmp_path)
    assert mode(out) == 0o777 & ~mask
    assert all(mode(f) == 0o666 & ~mask for f in out.iterdir())


def test_converted_checkpoint_folder_follows_the_umask(tmp_path, mask, monkeypatch):
    """The SmolLM2 conversion, with the GGUF reading replaced by a stand-in that writes one file."""

    class Saved:
        config = SimpleNamespace(quantization_config="gguf")

        def save_pretrained(self, folder):
            write_private(folder / "model.safetensors")

    monkeypatch.setenv("CONTINUAL_FT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_smollm2_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: Saved())
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **kw: Saved())
    target = models._smollm2_checkpoint()
    assert target == tmp_path / "cache" / "smollm2-135m"
    assert mode(target) == 0o777 & ~mask and mode(target / "model.safetensors") == 0o666 & ~mask


def test_atomic_dir_replaces_all_or_nothing(tmp_path):
    out = tmp_path / "adapter"
    with atomic_dir(out) as tmp:
        (tmp / "old.bin").write_text("old")
        (tmp / "kept.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "kept.txt").write_text("half")
            raise RuntimeError("killed while writing")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"old.bin": "old", "kept.txt": "old"}
    with atomic_dir(out) as tmp:
        (tmp / "new.bin").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.bin"]  # nothing of the old folder is left in it
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary sibling either
