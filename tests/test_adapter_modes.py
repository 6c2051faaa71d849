"""Adapter modes across stages (stack, merge, merge_final) on a tiny model: effects, formulas, saved files."""

import pytest
import torch
from conftest import make_examples, make_stage
from peft import PeftModel
from toy import write_toy_scenario
from transformers import AutoModelForCausalLM, AutoTokenizer

from continual_ft.config import LoraConfig, MergeConfig, TrainConfig, make_config
from continual_ft.errors import ContinualFTError
from continual_ft.model import adapters
from continual_ft.model.adapters import MERGE_METHODS, finish_stage, start_stage
from continual_ft.model.loading import load_model
from continual_ft.run.runner import run
from continual_ft.strategies import AGEM, EWC, STRATEGIES, LwF
from continual_ft.strategies.agem import AGEMConfig
from continual_ft.strategies.ewc import EWCConfig
from continual_ft.train.batching import Encoder
from continual_ft.train.loop import train_stage

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def _params(model, adapter):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def _perturb(model, seed=0):
    """Stand-in for training: move what requires grad (LoRA B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model, ids=IDS):
    """Logits on the CPU, whichever device the model sits on (a run moves it to the GPU when there is one)."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.cpu()


def test_stack_keeps_earlier_adapter_unchanged_while_the_next_trains():
    model, tok = load_model("tiny", seed=0)
    encoder = Encoder(tok, 64, chat_template=False)
    cfg = TrainConfig(max_steps=3, batch_size=4, warmup_steps=0, lr=1e-2)
    model = start_stage(model, "stack", 0, LoraConfig(r=4))
    train_stage(model, encoder, make_examples("a", 12), [], cfg, progress=False)
    stage1 = _params(model, "stage1")
    assert any(p.abs().sum() > 0 for n, p in stage1.items() if "lora_B" in n)  # stage 1 trained
    model = start_stage(model, "stack", 1, LoraConfig(r=4))
    train_stage(model, encoder, make_examples("b", 12), [], cfg, progress=False)
    assert all(torch.equal(stage1[n], p) for n, p in _params(model, "stage1").items())
    assert any(p.abs().sum() > 0 for n, p in _params(model, "stage2").items() if "lora_B" in n)
    assert model.base_model.active_adapters == ["stage1", "stage2"]


def test_merge_folds_scaled_BA_into_the_base_weight(tmp_path):
    r, alpha = 4, 8
    model, _ = load_model("tiny", seed=0)
    model = start_stage(model, "merge", 0, LoraConfig(r=r, alpha=alpha))
    _perturb(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    W = q.base_layer.weight.detach().clone()
    expected = W + (alpha / r) * q.lora_B["stage1"].weight @ q.lora_A["stage1"].weight
    out = finish_stage(model, "merge", 0, tmp_path, MergeConfig())
    assert not isinstance(out.model, PeftModel) and out.serving_dirs == []
    merged = out.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(merged, W)
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-6)
    assert (tmp_path / "adapters" / "stage1" / "adapter_model.safetensors").exists()
    # The next stage trains a fresh adapter on the merged model: it starts as a no-op.
    before = _logits(out.model)
    model = start_stage(out.model, "merge", 1, LoraConfig(r=r, alpha=alpha))
    assert adapters.adapter_names(model) == ["stage2"]
    torch.testing.assert_close(_logits(model), before)


def test_merge_final_with_one_adapter_reproduces_it(tmp_path):
    # With one adapter PEFT always combines linearly (cat too): A' = √(w s) A, B' = √(w s) B,
    # scaling 1. With s = α/r = 4 and w = 1, √4 = 2 is a power of two, so B'A'x = 4 BAx bit for bit.
    model, _ = load_model("tiny", seed=0)
    model = start_stage(model, "merge_final", 0, LoraConfig(r=4, alpha=16))
    _perturb(model)
    expected = _logits(model)
    out = finish_stage(model, "merge_final", 0, tmp_path, MergeConfig(method="cat", weights=[1.0]))
    assert model.base_model.active_adapters == ["merged"]
    assert torch.equal(_logits(out.model), expected)
    assert out.merged_dir == tmp_path / "adapters" / "merged"


def test_merge_final_trains_each_adapter_alone_and_cat_sums_them(tmp_path):
    model, _ = load_model("tiny", seed=0)
    model = start_stage(model, "merge_final", 0, LoraConfig(r=4))
    _perturb(model, seed=1)
    only_first = _logits(model)
    model = finish_stage(model, "merge_final", 0, tmp_path, MergeConfig(method="cat")).model
    model = start_stage(model, "merge_final", 1, LoraConfig(r=4))
    assert model.base_model.active_adapters == ["stage2"] and adapters.evaluated_adapter(model) == "merged"
    trainable = {n.split(".lora_")[1].split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"stage2"}
    base_logits = _logits(load_model("tiny", seed=0)[0])
    torch.testing.assert_close(_logits(model), base_logits)  # stage 2 starts from the base alone
    _perturb(model, seed=2)
    out = finish_stage(model, "merge_final", 1, tmp_path, MergeConfig(method="cat"))
    combined = _logits(out.model)
    model.base_model.set_adapter(["stage1", "stage2"])  # what stacking both computes: the sum of deltas
    torch.testing.assert_close(combined, _logits(model), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(combined, only_first)


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_every_merge_method_saves_an_adapter_plain_peft_loads(method, tmp_path):
    model, _ = load_model("tiny", seed=0)
    for k in range(2):
        model = start_stage(model, "merge_final", k, LoraConfig(r=4))
        _perturb(model, seed=k)
        out = finish_stage(model, "merge_final", k, tmp_path, MergeConfig(method=method, weights=[1.0, 0.5]))
        model = out.model
    reloaded = PeftModel.from_pretrained(load_model("tiny", seed=0)[0], out.merged_dir)
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-5, rtol=1e-5)


def test_magmax_keeps_the_larger_delta_entry_with_its_sign(tmp_path):
    # s = α/r = 1, A_j = [I_4 | 0]: ΔW_j's first row starts with B_j's first row; weights (1, 0.5).
    model, _ = load_model("tiny", seed=0)
    rows = {0: [2.0, 1.0, -1.0, 0.0], 1: [-3.0, -4.0, 0.5, 0.0]}
    for k in range(2):
        model = start_stage(model, "merge_final", k, LoraConfig(r=4, alpha=4))
        _perturb(model, seed=k)
        q = model.base_model.model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            q.lora_A[f"stage{k + 1}"].weight.copy_(torch.eye(4, 64))
            q.lora_B[f"stage{k + 1}"].weight[0] = torch.tensor(rows[k])
        deltas = {n: q.get_delta_weight(n) for n in q.lora_A if n != "merged"}
        out = finish_stage(model, "merge_final", k, tmp_path, MergeConfig(method="magmax", weights=[1.0, 0.5]))
        model = out.model
    merged = q.get_delta_weight("merged")
    assert merged[0, :4].tolist() == [2.0, -2.0, -1.0, 0.0]  # 2 vs −1.5, 1 vs −2, −1 vs 0.25, 0 vs 0
    assert torch.equal(merged[:, 4:], torch.zeros(64, 60))
    first, second = deltas["stage1"], 0.5 * deltas["stage2"]
    assert torch.equal(merged, torch.where(first.abs() >= second.abs(), first, second))  # and so in every layer:
    for layer in model.base_model.model.model.layers:
        for module in (layer.self_attn.k_proj, layer.mlp.down_proj):  # a wide and a tall weight
            first, second = module.get_delta_weight("stage1"), 0.5 * module.get_delta_weight("stage2")
            expected = torch.where(first.abs() >= second.abs(), first, second)
            torch.testing.assert_close(module.get_delta_weight("merged"), expected, rtol=1e-6, atol=1e-7)
            assert module.lora_A["merged"].weight.shape[0] == min(expected.shape)  # rank min(out, in)


def test_magmax_with_one_adapter_reproduces_it(tmp_path):
    model, _ = load_model("tiny", seed=0)
    model = start_stage(model, "merge_final", 0, LoraConfig(r=4, alpha=16))
    _perturb(model)
    expected = _logits(model)
    out = finish_stage(model, "merge_final", 0, tmp_path, MergeConfig(method="magmax"))
    assert model.base_model.active_adapters == ["merged"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".merged." in n)
    torch.testing.assert_close(_logits(out.model), expected, atol=1e-5, rtol=1e-5)


def test_merge_final_run_with_magmax_saves_what_it_evaluated(tmp_path, monkeypatch):
    results, final = _toy_run(tmp_path, "merge_final", "method=magmax", monkeypatch=monkeypatch)
    assert results.data["complete"] and len(results.data["stage_stats"]) == 2
    reloaded = PeftModel.from_pretrained(load_model("tiny", seed=0)[0], results.run_dir / "adapters" / "merged")
    torch.testing.assert_close(_logits(reloaded), _logits(final.to("cpu")), atol=1e-5, rtol=1e-5)


def _toy_run(tmp_path, adapter, *extra, monkeypatch=None):
    scenario = write_toy_scenario(tmp_path / "data")
    captured = {}
    if monkeypatch is not None:  # keep the final in-memory model to compare with what was saved
        finish_run = adapters.finish_run

        def keep(model, *args, **kwargs):
            captured["model"] = model
            return finish_run(model, *args, **kwargs)

        monkeypatch.setattr(adapters, "finish_run", keep)
    config = make_config(
        [
            f"scenario={scenario}",
            "model=tiny",
            "precision=fp32",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.lr=1e-2",
            f"output_dir={tmp_path / 'runs'}",
            f"adapter={adapter}",
            *extra,
        ],
        tuple(STRATEGIES),
    )
    return run(config, progress=False), captured.get("model")


@pytest.mark.parametrize("adapter", ["stack", "merge", "merge_final"])
def test_saved_results_load_with_plain_peft_and_transformers(adapter, tmp_path, monkeypatch):
    results, final = _toy_run(tmp_path, adapter, "method=cat", monkeypatch=monkeypatch)
    d, run_dir = results.data, results.run_dir
    expected = _logits(final.to("cpu"))  # the reloaded models below are on the CPU: compare on one device
    base = load_model("tiny", seed=0)[0]
    if adapter == "stack":
        model = PeftModel.from_pretrained(base, run_dir / "adapters" / "stage1", adapter_name="stage1")
        model.load_adapter(run_dir / "adapters" / "stage2", adapter_name="stage2")
        model.base_model.set_adapter(["stage1", "stage2"])
    elif adapter == "merge":
        model = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
        assert AutoTokenizer.from_pretrained(run_dir / "merged").pad_token == "<|pad|>"
        assert d["merged_model_dir"] == "merged"
        # The per-stage adapters rebuild it too: stage k applies on top of stages 1..k-1 merged.
        rebuilt = base
        for k in (1, 2):
            rebuilt = PeftModel.from_pretrained(rebuilt, run_dir / "adapters" / f"stage{k}").merge_and_unload()
        torch.testing.assert_close(_logits(rebuilt), expected, atol=1e-5, rtol=1e-5)
    else:
        model = PeftModel.from_pretrained(base, run_dir / "adapters" / "merged")
        assert d["stage_stats"][-1]["merged_adapter_bytes"] > d["stage_stats"][-1]["adapter_bytes"]  # cat: rank 8
    assert torch.equal(_logits(model), expected) or torch.allclose(_logits(model), expected, atol=1e-5)
    for row in d["stage_stats"]:
        assert row["eval_seconds_per_example"] > 0 and row["eval_tokens_per_s"] > 0 and row["adapter_bytes"] > 0
    serving = [row["serving_adapter_bytes"] for row in d["stage_stats"]]
    if adapter == "stack":  # inference carries every stage's adapter
        assert serving[1] == serving[0] + d["stage_stats"][1]["adapter_bytes"]
    elif adapter == "merge":
        assert serving == [0, 0]


def _spy(monkeypatch, cls, name, record):
    """Wrap ``cls.name`` so that ``record(self, *args, result)`` sees every call (the method still runs)."""
    original = getattr(cls, name)

    def wrapped(self, *args):
        result = original(self, *args)
        record(self, *args, result)
        return result

    monkeypatch.setattr(cls, name, wrapped)


@pytest.mark.parametrize("adapter", ["continue", "stack", "merge", "merge_final"])
def test_lwf_teacher_is_the_model_evaluated_after_the_previous_stage(adapter, tmp_path, monkeypatch):
    """In a run, every stage-2 teacher forward gives the logits of the model the runner evaluated after
    stage 1, while the student has moved away from it (merge_final: the combination, not the base)."""
    seen = {"teacher": [], "student": []}

    finish_stage = adapters.finish_stage

    def evaluated(model, mode, stage, *args, **kwargs):
        out = finish_stage(model, mode, stage, *args, **kwargs)
        if stage == 0:
            seen["evaluated"] = _logits(out.model)
        return out

    def distilled(lwf, model, batch, outputs, result):
        if lwf.teacher is not None:
            ids = IDS.to(next(model.parameters()).device)
            seen["teacher"].append(lwf.teacher_logits(model, {"input_ids": ids}).cpu())
            seen["student"].append(_logits(model))
            model.train()

    monkeypatch.setattr(adapters, "finish_stage", evaluated)
    _spy(monkeypatch, LwF, "penalty", distilled)
    results, _ = _toy_run(tmp_path, adapter, "strategy=lwf", "lwf.fraction=1", "method=cat", "train.warmup_steps=0")
    assert results.data["stage_stats"][1]["penalty"] > 0
    assert len(seen["teacher"]) == 2  # both steps of stage 2 (train.max_steps=2)
    for teacher in seen["teacher"]:
        torch.testing.assert_close(teacher, seen["evaluated"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen["student"][-1], seen["evaluated"], atol=1e-5)  # one step moved the student
    if adapter == "merge_final":  # a resumed run rebuilds the same teacher from the saved stage adapters
        model = adapters.restore(
            load_model("tiny", seed=0)[0], adapter, 1, results.run_dir, LoraConfig(), MergeConfig()
        )
        model = start_stage(model, adapter, 1, LoraConfig())
        with adapters.only_adapter(model, adapters.evaluated_adapter(model)):
            torch.testing.assert_close(_logits(model), seen["evaluated"], atol=1e-5, rtol=1e-5)


def test_the_teacher_forward_leaves_the_trained_adapter_as_it_was(tmp_path):
    model, _ = load_model("tiny", seed=0)
    model = start_stage(model, "merge_final", 0, LoraConfig(r=4))
    _perturb(model, seed=1)
    combined = _logits(finish_stage(model, "merge_final", 0, tmp_path, MergeConfig()).model)
    model = start_stage(model, "merge_final", 1, LoraConfig(r=4))
    _perturb(model, seed=2)
    student = _logits(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with adapters.only_adapter(model, "merged"):
        torch.testing.assert_close(_logits(model), combined)
    assert model.base_model.active_adapters == ["stage2"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(_logits(model), student)


def test_ewc_penalty_and_its_gradient_reach_the_trained_adapter_in_stage_two(tmp_path, monkeypatch):
    """adapter=continue, the one mode EWC acts in: the penalty is > 0 once stage 2 moved the adapter,
    and its gradient reaches the A and B of the adapter that trains."""
    seen = []

    def record(ewc, model, batch, outputs, value):
        if value is not None:
            trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
            grads = torch.autograd.grad(value, list(trained.values()), retain_graph=True, allow_unused=True)
            seen.append((float(value.detach()), dict(zip(trained, grads))))

    _spy(monkeypatch, EWC, "penalty", record)
    results, _ = _toy_run(tmp_path, "continue", "strategy=ewc", "ewc.fisher_batches=1", "train.warmup_steps=0")
    assert results.data["stage_stats"][0]["penalty"] is None and results.data["stage_stats"][1]["penalty"] > 0
    value, grads = seen[-1]  # step 2 of stage 2: the first step moved the adapter off its anchor
    assert value > 0 and grads and all(".default." in n for n in grads)
    for part in ("lora_A", "lora_B"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if part in n), part


def test_ewc_refuses_a_fresh_adapter_in_a_loop_that_skips_the_run_checks():
    model, tok = load_model("tiny", seed=0)
    model = start_stage(model, "stack", 0, LoraConfig(r=4))
    _perturb(model)
    ewc = EWC(EWCConfig(fisher_batches=1))
    ewc.after_stage(model, make_stage(model, tok, 0, make_examples("a", 8)))
    assert ewc.anchors
    model = start_stage(model, "stack", 1, LoraConfig(r=4))
    with pytest.raises(
        ContinualFTError, match="^strategy=ewc needs adapter=continue: the parameters trained in stage 2"
    ):
        ewc.before_stage(model, make_stage(model, tok, 1, make_examples("b", 8)))


def _memory_gradient(model, stage, examples, params):
    model.eval()
    grads, tokens = [], 0
    for batch in stage.batches(examples):
        n = int((batch["labels"] != -100).sum())
        grads.append(n * torch.cat([g.reshape(-1) for g in torch.autograd.grad(stage.loss_fn(model, batch), params)]))
        tokens += n
    model.train()
    return sum(grads) / tokens


@pytest.mark.parametrize("adapter", ["continue", "stack", "merge"])
def test_agem_projects_the_trained_adapter_against_the_evaluated_models_memory(adapter, tmp_path):
    """Stage 2 starts as the model evaluated after stage 1, so A-GEM's reference gradient is that model's
    memory gradient with respect to the adapter that trains; a step against it is projected."""
    model, tok = load_model("tiny", seed=0)
    model = start_stage(model, adapter, 0, LoraConfig(r=4))
    _perturb(model)
    first = make_examples("a", 8)
    agem = AGEM(AGEMConfig(memory_size=8, reference_batch=8))
    agem.after_stage(model, make_stage(model, tok, 0, first))
    out = finish_stage(model, adapter, 0, tmp_path, MergeConfig())
    evaluated = _logits(out.model)
    model = start_stage(out.model, adapter, 1, LoraConfig(r=4))
    torch.testing.assert_close(_logits(model), evaluated)
    stage = make_stage(model, tok, 1, make_examples("b", 8))
    params = [p for p in model.parameters() if p.requires_grad]
    ref = _memory_gradient(model, stage, first, params)
    assert ref.norm() > 0
    g = -ref + 0.5 * ref.norm() * torch.nn.functional.normalize(torch.randn(ref.shape), dim=0)
    offset = 0
    for p in params:
        p.grad = g[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    agem.after_backward(model, stage, step=1)
    after = torch.cat([p.grad.reshape(-1) for p in params])
    assert agem.projected == 1 and abs(torch.dot(after, ref)) < 1e-4 * after.norm() * ref.norm()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# Every strategy in every adapter mode where it would do nothing of its own, and the line that stops it.
REFUSED = (
    {
        ("ewc", mode): f"strategy=ewc needs adapter=continue: under adapter={mode} each stage trains a fresh adapter "
        "with no Fisher of its own"
        for mode in ("new", "stack", "merge", "merge_final")
    }
    | {
        ("olora", mode): f"strategy=olora needs adapter=new or stack: under adapter={mode} no earlier adapter stays "
        "active beside the trained one for it to be orthogonal to"
        for mode in ("continue", "merge", "merge_final")
    }
    | {
        ("agem", "merge_final"): "strategy=agem needs adapter=continue, new, stack or merge: under adapter=merge_final "
        "each stage trains a fresh adapter from the base model alone, so the memory's gradient would be the base "
        "model's, not that of the evaluated combination of the earlier stages"
    }
)


def test_every_strategy_runs_in_every_adapter_mode_but_the_refused_ones():
    from continual_ft.run.checks import check_config

    for name in STRATEGIES:
        for mode in adapters.ADAPTER_MODES:
            config = make_config([f"strategy={name}", f"adapter={mode}", "model=tiny"], tuple(STRATEGIES))
            if (name, mode) in REFUSED:
                with pytest.raises(ContinualFTError) as e:
                    check_config(config)
                assert str(e.value) == REFUSED[name, mode]
            else:
                check_config(config)


@pytest.mark.parametrize("strategy, adapter", sorted(REFUSED))
def test_a_refused_pair_stops_the_run_before_anything_is_written(strategy, adapter, tmp_path):
    with pytest.raises(ContinualFTError) as e:
        _toy_run(tmp_path, adapter, f"strategy={strategy}")
    assert str(e.value) == REFUSED[strategy, adapter] and "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_the_cli_refuses_ewc_under_stack_in_one_line(tmp_path, capsys):
    from continual_ft.cli import main

    scenario = write_toy_scenario(tmp_path / "data")
    with pytest.raises(SystemExit) as e:
        main(
            [
                "run",
                f"scenario={scenario}",
                "model=tiny",
                "strategy=ewc",
                "adapter=stack",
                f"output_dir={tmp_path / 'runs'}",
            ]
        )
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {REFUSED['ewc', 'stack']}\n"
    assert not (tmp_path / "runs").exists()


def test_method_is_shorthand_for_merge_method():
    assert make_config(["method=ties"]).merge.method == "ties"
    assert make_config({"method": "svd"}).merge.method == "svd"
    assert make_config([]).merge.method == "cat"
    with pytest.raises(ContinualFTError, match="merge.method must be one of cat, svd, linear, ties, dare_ties"):
        make_config(["method=average"])
    with pytest.raises(ContinualFTError, match=r"merge.density must be in \(0, 1\]"):
        make_config(["merge.density=0"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["adapter=fold"], "unknown adapter 'fold'"),
        (["adapter=merge", "strategy=olora"], "strategy=olora needs adapter=new or stack"),
        (["adapter=merge_final", "merge.weights=[1.0]"], "merge.weights has 1 values; the scenario has 2 stages"),
    ],
)
def test_bad_adapter_settings_fail_before_the_run_directory(extra, message, tmp_path):
    with pytest.raises(ContinualFTError, match=message):
        _toy_run(tmp_path, "stack", *extra)
    assert not (tmp_path / "runs").exists()


def test_list_shows_every_adapter_mode_and_merge_method(capsys):
    from continual_ft.cli import main

    main(["list"])
    out = capsys.readouterr().out
    for name in [*adapters.ADAPTER_MODES, *MERGE_METHODS]:
        assert f"  {name} " in out, name


# Avalanche's own strategies: its regularizers key their importances by parameter name (naive under a fresh
# adapter per stage), its LwF and A-GEM read the model that trains (under merge_final, not the evaluated one).
AVALANCHE_MODES = {
    "avalanche:naive": None,
    "avalanche:replay": None,
    "avalanche:cumulative": None,
    "avalanche:ewc": ("continue",),
    "avalanche:si": ("continue",),
    "avalanche:mas": ("continue",),
    "avalanche:lwf": ("continue", "new", "stack", "merge"),
    "avalanche:agem": ("continue", "new", "stack", "merge"),
}


def test_avalanche_strategies_are_refused_where_they_would_do_nothing_of_their_own():
    from continual_ft.run.checks import check_adapter
    from continual_ft.strategies import AVALANCHE_LOOPS, build

    assert set(AVALANCHE_MODES) == set(AVALANCHE_LOOPS)
    for name, modes in AVALANCHE_MODES.items():
        (strategy,) = build(name)
        for mode in adapters.ADAPTER_MODES:
            if modes is None or mode in modes:
                check_adapter(strategy, mode)
                continue
            with pytest.raises(ContinualFTError, match=rf"^strategy={name} needs adapter=.*under adapter={mode} "):
                check_adapter(strategy, mode)
