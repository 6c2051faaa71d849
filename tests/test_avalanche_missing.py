"""Without avalanche-lib, ``strategy=avalanche:*`` and the integration stop with one line naming the install,
before a run directory exists. Runs in every environment: the import is made to fail here."""

import builtins

import pytest

from continual_ft.cli import main
from continual_ft.errors import ContinualFTError
from continual_ft.integrations import avalanche as av


@pytest.fixture
def no_avalanche(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "avalanche" or name.startswith("avalanche."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(av, "_PLUGINS", {})  # classes built in an environment that has Avalanche


def test_cli_run_is_one_line_naming_the_install(no_avalanche, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "strategy=avalanche:ewc", "model=tiny", f"output_dir={tmp_path / 'runs'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: strategy=avalanche:ewc needs avalanche-lib")
    assert 'pip install "continual-ft[avalanche]"' in err and "torchvision" in err
    assert not (tmp_path / "runs").exists()


def test_library_entry_points_say_the_same(no_avalanche):
    with pytest.raises(ContinualFTError, match=r"needs avalanche-lib .*continual-ft\[avalanche\]"):
        av.StrategyPlugin  # noqa: B018 (the attribute access builds the class)
    with pytest.raises(ContinualFTError, match="benchmark"):
        av.benchmark(None, None)
