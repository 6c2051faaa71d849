"""``precision=auto``: the CPU matmul probe, its cache, the 1.1x rule, and what a run prints and records.

The probe itself (``precision.measure``) is replaced by fake timings that count their calls: speed is
measured by ``bench/``, never asserted here. Every test has its own cache folder (``CONTINUAL_FT_CACHE``).
"""

import json

import pytest
import torch
from toy import write_toy_scenario

from continual_ft.config import make_config
from continual_ft.run.runner import resume, run
from continual_ft.train import precision
from continual_ft.train.loop import resolve_precision
from continual_ft.train.precision import PrecisionChoice, choose_precision, pick

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh cache folder: the user's own is never read or written."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CONTINUAL_FT_CACHE", str(folder))
    return folder


class FakeProbe:
    """``measure`` returning fixed (bf16, fp32) TFLOP/s, or raising ``error``; counts its calls."""

    def __init__(self, bf16=2.0, fp32=1.0, error=None):
        self.bf16, self.fp32, self.error, self.calls = bf16, fp32, error, 0

    def __call__(self):
        self.calls += 1
        if self.error:
            raise self.error
        return self.bf16, self.fp32


@pytest.fixture
def probe(monkeypatch):
    fake = FakeProbe()
    monkeypatch.setattr(precision, "measure", fake)
    return fake


def test_the_second_choice_comes_from_the_cache_without_a_probe(probe, cache):
    first = choose_precision("auto", CPU)
    assert probe.calls == 1 and first.precision == "bf16"
    assert first.reason == "bf16 matmul 2.00x fp32 on this CPU" and first.probe["cached"] is False
    assert json.loads((cache / "precision.json").read_text())  # one entry written
    second = choose_precision("auto", CPU)
    assert probe.calls == 1  # no second probe
    assert second.precision == "bf16" and second.reason == "bf16 matmul 2.00x fp32 on this CPU, cached"
    assert second.probe["cached"] is True and second.probe["ratio"] == 2.0
    assert second.line == "precision: bf16 (bf16 matmul 2.00x fp32 on this CPU, cached)"


@pytest.mark.parametrize("asked", ["bf16", "fp32"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_explicit_precision_is_kept_and_never_probes(monkeypatch, cache, asked, device):
    probe = FakeProbe(bf16=1.0, fp32=2.0) if asked == "bf16" else FakeProbe(bf16=9.0, fp32=1.0)  # auto would differ
    monkeypatch.setattr(precision, "measure", probe)
    choice = choose_precision(asked, torch.device(device))
    assert (choice.precision, choice.reason, choice.probe) == (asked, "set explicitly", None)
    assert resolve_precision(asked, torch.device(device)) == asked
    assert probe.calls == 0 and not cache.exists()


def test_auto_on_a_gpu_never_probes(probe, monkeypatch):
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        choice = choose_precision("auto", torch.device("cuda"))
        assert choice.precision == expected and choice.probe is None
    assert probe.calls == 0


@pytest.mark.parametrize(
    "fake",
    [
        FakeProbe(error=RuntimeError("oneDNN could not create a primitive\nand a second line")),
        FakeProbe(bf16=float("nan"), fp32=1.0),
        FakeProbe(bf16=1.0, fp32=0.0),
    ],
)
def test_a_failing_probe_falls_back_to_fp32_with_a_one_line_note(monkeypatch, cache, fake):
    monkeypatch.setattr(precision, "measure", fake)
    choice = choose_precision("auto", CPU)  # no exception
    assert choice.precision == "fp32" and choice.probe is None
    assert choice.reason.startswith("the bf16/fp32 matmul probe failed, fp32 chosen (")
    assert "\n" not in choice.line
    if fake.error:
        assert "RuntimeError: oneDNN could not create a primitive)" in choice.reason
    assert not (cache / "precision.json").exists()  # nothing cached: the next run measures again
    choose_precision("auto", CPU)
    assert fake.calls == 2


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b"\xff\xfe", b"{KEY: {'bf16_tflops': 'fast', 'fp32_tflops': 1.0}}"],
    ids=["truncated", "a list", "not utf-8", "a bad entry"],
)
def test_a_corrupt_cache_is_measured_again_and_rewritten(probe, cache, content):
    cache.mkdir()
    key = precision.probe_key(precision._machine())
    (cache / "precision.json").write_bytes(content.replace(b"KEY", json.dumps(key).encode()).replace(b"'", b'"'))
    choice = choose_precision("auto", CPU)
    assert probe.calls == 1 and choice.precision == "bf16" and "measured again" in choice.reason
    assert "\n" not in choice.line
    assert json.loads((cache / "precision.json").read_text())[key]["bf16_tflops"] == 2.0  # rewritten, readable
    assert choose_precision("auto", CPU).reason.endswith(", cached") and probe.calls == 1


def test_an_unwritable_cache_folder_uses_the_measurement_uncached(probe, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CONTINUAL_FT_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    choice = choose_precision("auto", CPU)
    assert choice.precision == "bf16" and "not cached" in choice.reason and "\n" not in choice.line
    choose_precision("auto", CPU)
    assert probe.calls == 2


@pytest.mark.parametrize(
    ("bf16", "fp32", "expected"),
    [(1.1, 1.0, "bf16"), (1.09, 1.0, "fp32"), (0.148, 0.256, "fp32"), (0.381, 0.177, "bf16"), (1.0, 1.0, "fp32")],
)
def test_bf16_only_where_it_is_at_least_1_1x_as_fast(monkeypatch, bf16, fp32, expected):
    assert pick(bf16, fp32) == expected
    monkeypatch.setattr(precision, "measure", FakeProbe(bf16=bf16, fp32=fp32))
    choice = choose_precision("auto", CPU)
    assert choice.precision == expected and f"bf16 matmul {bf16 / fp32:.2f}x fp32" in choice.reason


def test_the_cache_key_changes_with_the_thread_count(probe, monkeypatch):
    machine = precision._machine()
    assert precision.probe_key({**machine, "threads": 1}) != precision.probe_key({**machine, "threads": 2})
    for threads, calls in ((1, 1), (1, 1), (3, 2), (1, 2)):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        choice = choose_precision("auto", CPU)
        assert probe.calls == calls and choice.probe["threads"] == threads


class FakeDist:
    """Rank ``rank`` of two processes; rank 0's choice is what ``broadcast`` hands every rank."""

    world = 2

    def __init__(self, rank, sent=None):
        self.rank, self.sent = rank, sent

    @property
    def is_main(self):
        return self.rank == 0

    def broadcast(self, obj):
        if self.is_main:
            self.sent = obj
        return self.sent


def test_with_several_processes_only_the_first_probes_and_all_take_its_choice(probe):
    first = FakeDist(0)
    chosen = choose_precision("auto", CPU, first)
    assert probe.calls == 1 and first.sent is chosen and chosen.precision == "bf16"
    probe.bf16 = 0.5  # the other process would choose fp32 on its own
    other = choose_precision("auto", CPU, FakeDist(1, sent=chosen))
    assert other == chosen and probe.calls == 1


def _settings(tmp_path) -> list[str]:
    scenario = write_toy_scenario(tmp_path / "data")
    return [f"scenario={scenario}", "model=tiny", "train.max_steps=2", "train.batch_size=4", f"output_dir={tmp_path}/r"]


class _Stop(Exception):
    pass


def _stop_after_first_stage(i, record):
    if i == 0:
        raise _Stop


def test_a_run_prints_its_choice_once_and_records_it_and_a_resume_keeps_it(probe, tmp_path, capsys):
    config = make_config([*_settings(tmp_path), "name=auto"])
    with pytest.raises(_Stop):
        run(config, on_stage=_stop_after_first_stage)
    run_dir = tmp_path / "r" / "auto"
    results = json.loads((run_dir / "results.json").read_text())
    device = torch.device(results["device"])
    expected = PrecisionChoice("bf16", "bf16 matmul 2.00x fp32 on this CPU") if device.type == "cpu" else None
    expected = expected or choose_precision("auto", device)  # a GPU: as before, never probed
    assert results["precision"] == expected.precision and results["precision_reason"] == expected.reason
    assert (results["precision_probe"] or {}).get("ratio") == (2.0 if device.type == "cpu" else None)
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("precision:")]
    assert printed == [expected.line]

    probe.bf16 = 0.5  # this machine would now choose fp32: the resumed run goes on in bf16 all the same
    (tmp_path / "cache" / "precision.json").unlink(missing_ok=True)
    resume(run_dir)
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("precision:")]
    assert printed == [f"precision: {expected.precision} (as the run it resumes)"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] and results["precision"] == expected.precision
    assert results["precision_reason"] == expected.reason  # the run's, from its start
    assert probe.calls == (1 if device.type == "cpu" else 0)


def test_an_explicit_precision_is_recorded_as_set(probe, tmp_path):
    results = run(make_config([*_settings(tmp_path), "precision=fp32", "name=fp32"]), progress=False).data
    assert (results["precision"], results["precision_reason"], results["precision_probe"]) == (
        "fp32",
        "set explicitly",
        None,
    )
    assert probe.calls == 0
