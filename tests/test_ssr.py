"""Self-synthesized rehearsal: the generation it relies on, and what it keeps and replays."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_examples, make_stage

from continual_ft.data.tasks import Example
from continual_ft.errors import ContinualFTError
from continual_ft.strategies import StageInfo, build
from continual_ft.strategies.ssr import MARK, SSR, SSRConfig, _Slot, template
from continual_ft.train.generation import nucleus


def _greedy(model, tokenizer, text: str, n: int) -> str:
    """Reference greedy decoding: one full forward per token, no cache, no padding."""
    device = next(model.parameters()).device
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if next_id.item() == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_generate_greedy_matches_unpadded_decoding(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    stage = make_stage(model, tokenizer, 0, make_examples("a", 4), batch_size=3)
    prompts = ["a short one", "a much longer prompt than the first, so the batch is left-padded", "mid length text"]
    got = stage.generate(model, prompts, 6, chat=False)
    assert got == [_greedy(model, tokenizer, p, 6) for p in prompts]


def _greedy_ids(model, tokenizer, text: str, n: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text + _greedy(model, tokenizer, text, n), add_special_tokens=False)["input_ids"][len(ids) :]


def _batch_sizes(model) -> tuple[list[int], object]:
    """The number of rows of every forward through ``model``'s decoder, and the hook's handle."""
    sizes = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hook = base.model.register_forward_pre_hook(
        lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    return sizes, hook


def test_generate_keeps_prompt_order_across_length_sorted_batches(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    stage = make_stage(model, tokenizer, 0, make_examples("a", 4), batch_size=2)
    prompts = ["a much longer prompt than the others, so it sorts last", "short", "mid length text", "tiny"]
    assert stage.generate(model, prompts, 5, chat=False) == [_greedy(model, tokenizer, p, 5) for p in prompts]


def test_a_row_that_meets_a_stop_string_leaves_the_batch(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    stage = make_stage(model, tokenizer, 0, make_examples("a", 4), batch_size=2)
    prompts, n = ["one two three", "four five six"], 8
    full = [_greedy(model, tokenizer, p, n) for p in prompts]
    first = _greedy_ids(model, tokenizer, prompts[0], n)
    # Row 0's first three new tokens as the stop string: it stops after its third, row 1 never meets it.
    k, stop = 2, tokenizer.decode(first[:3])
    assert stop not in tokenizer.decode(first[:2]) and stop not in full[1]
    sizes, hook = _batch_sizes(model)
    try:
        got = stage.generate(model, prompts, n, chat=False, stop=[stop])
    finally:
        hook.remove()
    assert got == [tokenizer.decode(first[: k + 1], skip_special_tokens=True), full[1]]
    assert sizes[: k + 1] == [2] * (k + 1) and set(sizes[k + 1 :]) == {1}  # prefill and k steps with both rows


def test_the_prompts_shared_start_is_prefilled_once(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    stage = make_stage(model, tokenizer, 0, make_examples("a", 4), batch_size=3)
    head = "Which license is this? Answer with its name.\n\nText: "
    prompts = [head + "permission is granted", head + "GPL", head + "all rights reserved, no warranty"]
    sizes, hook = _batch_sizes(model)
    try:
        got = stage.generate(model, prompts, 5, chat=False)
    finally:
        hook.remove()
    assert got == [_greedy(model, tokenizer, p, 5) for p in prompts]
    assert sizes[:2] == [1, 3]  # the shared start once, then the rest of every prompt after it


def test_samples_share_one_prefill_per_prompt(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    stage = make_stage(model, tokenizer, 0, make_examples("a", 4), batch_size=4)
    prompts = ["one two three", "one two, then a longer second prompt"]
    sizes, hook = _batch_sizes(model)
    try:
        # A nucleus this small keeps only the most likely token: every sample is the greedy text.
        narrow = stage.generate(model, prompts, 4, chat=False, temperature=1.0, top_p=1e-6, samples=3)
    finally:
        hook.remove()
    assert sizes == [1, 2, 6, 6, 6]  # the shared start, the prompts, then three rows per prompt
    assert narrow == [_greedy(model, tokenizer, p, 4) for p in prompts for _ in range(3)]
    wide = stage.generate(model, prompts, 4, chat=False, temperature=1.0, samples=3, seed=3)
    assert len(wide) == 6 and len(set(wide[:3])) > 1  # independent draws from the one prefill


@pytest.mark.parametrize("top_p", [1e-6, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("spread", [0.5, 8.0])  # near uniform (the nucleus needs most of the vocabulary), peaked
def test_nucleus_keeps_what_hfs_top_p_warper_keeps(top_p, spread):
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 3000, dtype=torch.float64) * spread  # float64: no ties between distinct tokens
    probs = torch.softmax(logits, -1)
    top, ids = nucleus(probs, top_p)
    expected = TopPLogitsWarper(top_p)(None, logits.clone()) > -float("inf")
    got = torch.zeros_like(expected)
    got.scatter_(-1, ids, top > 0)
    assert torch.equal(got, expected)
    assert torch.equal(top[top > 0], probs.gather(-1, ids)[top > 0])  # the kept tokens keep their probabilities


def test_generate_samples_by_seed_and_leaves_the_run_alone(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    stage = make_stage(model, tokenizer, 0, make_examples("a", 4))
    model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = stage.generate(model, ["x", "y"], 8, chat=False, temperature=1.0, seed=1)
    assert torch.equal(torch.rand(3), expected_next)  # the run's random stream is untouched
    assert model.training  # mode restored
    assert a == stage.generate(model, ["x", "y"], 8, chat=False, temperature=1.0, seed=1)
    assert a != stage.generate(model, ["x", "y"], 8, chat=False, temperature=1.0, seed=2)


def test_template_is_the_shared_instruction_and_cue():
    prompts = ["Q: which?\n\nText: one\n\nAnswer:", "Q: which?\n\nText: two two\n\nAnswer:"]
    assert template(prompts) == ("Q: which?\n\n", "\n\nAnswer:")
    assert template(["no line breaks a", "no line breaks b"]) == ("", "")


class Scripted:
    """Stands in for ``stage.generate``: returns written inputs, then answers, and records the calls."""

    def __init__(self, inputs: list[str], answers: dict[str, str], default: str = "???"):
        self.inputs, self.answers, self.default, self.calls = inputs, answers, default, []

    def __call__(self, model, prompts, max_new_tokens, *, chat=True, **kw):
        self.calls.append((list(prompts), chat, kw))
        if not chat:  # the next inputs in the list, as many as asked for
            n = len(prompts) * kw.get("samples", 1)
            written, self.inputs = self.inputs[:n], self.inputs[n:]
            return written
        return [self.answers.get(p, self.default) for p in prompts]


def _stage(index, examples, generate, final=False):
    """A stage whose ``generate`` is scripted (``batches`` and ``loss_fn`` are never used by SSR)."""
    tasks = list(dict.fromkeys(e.task for e in examples))
    return StageInfo(index, tasks, examples, batches=None, loss_fn=None, generate=generate, final=final)


HEAD, TAIL = "Pick a color.\n\n", "\n\nAnswer:"


def _colors(n):
    return [
        Example("colors", f"{HEAD}Text: {['cup', 'car', 'hat'][i % 3]} {i}{TAIL}", ["red", "blue"][i % 2], f"g{i}")
        for i in range(n)
    ]


def test_ssr_keeps_demos_and_filtered_synthetic_examples():
    own = _colors(20)
    written = [  # what the model writes after the open slot, which starts with the shared "Text:"
        " new one\n\nYou have a cure",  # kept: ends at the blank line; answered "Red." -> the known label "red"
        " new one",  # same input again: dropped
        "",  # empty: dropped
        f" new two\n{MARK} 5\nText: spill",  # cut where the model opens the next example
        " new three",  # answered with an unknown label: dropped
    ]
    answers = {
        f"{HEAD}Text: new one{TAIL}": "Red.",
        f"{HEAD}Text: new two{TAIL}": "blue",
        f"{HEAD}Text: new three{TAIL}": "purple",
    }
    generate = Scripted(written, answers)
    ssr = SSR(SSRConfig(per_task=10, demos=4, shots=2, oversample=1.0, samples=1))
    ssr.after_stage(None, _stage(0, own, generate))

    assert len(ssr.demos["colors"]) == 4 and set(ssr.demos["colors"]) <= set(own)
    assert {e.answer for e in ssr.demos["colors"]} == {"red", "blue"}  # demonstrations cover the answers
    assert [(e.prompt, e.answer) for e in ssr.synthetic["colors"]] == [
        (f"{HEAD}Text: new one{TAIL}", "red"),
        (f"{HEAD}Text: new two{TAIL}", "blue"),
    ]
    (contexts, chat, kw), (questions, chat2, _) = generate.calls
    assert not chat and chat2 and len(contexts) == 10 and kw["temperature"] == 1.0
    assert kw["stop"] == [MARK, "\n\n"]  # no demonstration has a blank line: one paragraph per input
    for context in contexts:  # instruction once, then two numbered demonstrations' bodies, then the open slot
        assert context.startswith(HEAD) and context.endswith(f"{MARK} 3\nText:") and context.count(MARK) == 3
        assert "Answer:" not in context
    assert len(questions) == 3  # the deduplicated, non-empty inputs, each asked with the task's template

    # State holds the demonstrations and the synthetic examples, not the stage's other real examples.
    state = ssr.state_dict()
    real = {e.prompt for e in own}
    stored = [e["prompt"] for es in state["demos"].values() for e in es]
    stored += [e["prompt"] for es in state["synthetic"].values() for e in es]
    assert len([p for p in stored if p in real]) == 4


def test_ssr_writes_several_inputs_per_context():
    inputs = [f" synthetic {i}" for i in range(12)]
    generate = Scripted(inputs, {}, default="red")
    ssr = SSR(SSRConfig(per_task=10, demos=4, shots=2, oversample=1.2, samples=3))
    ssr.after_stage(None, _stage(0, _colors(20), generate))
    (contexts, _, kw), (questions, _, _) = generate.calls
    assert len(contexts) == 4 and kw["samples"] == 3  # 12 inputs to write, three from each context
    assert len(questions) == 12 and len(ssr.synthetic["colors"]) == 10 and ssr.generated == 12


def test_ssr_writes_in_rounds_until_it_keeps_per_task():
    # Round 1 writes per_task = 10 inputs and keeps 5 (the other 5 repeat one); round 2 writes the
    # shortfall over the share kept, 5 / (5 / 10) = 10, and keeps 3 more; round 3 would ask for
    # 2 / (8 / 20) = 5 but only 2 are left of the budget, ceil(10 * 2.2) = 22.
    first = [f" a{i}" for i in range(5)] + [" a0"] * 5
    second = [f" b{i}" for i in range(3)] + [" b0"] * 7
    generate = Scripted(first + second + [" c0", " c1", " c2"], {}, default="red")
    ssr = SSR(SSRConfig(per_task=10, demos=4, shots=2, oversample=2.2, samples=1))
    ssr.after_stage(None, _stage(0, _colors(20), generate))
    writing = [(len(prompts), kw["seed"]) for prompts, chat, kw in generate.calls if not chat]
    assert [n for n, _ in writing] == [10, 10, 2] and len({seed for _, seed in writing}) == 3
    assert [len(prompts) for prompts, chat, _ in generate.calls if chat] == [5, 3, 2]
    assert len(ssr.synthetic["colors"]) == 10 and ssr.generated == 22

    # A filter that keeps everything: one round of per_task inputs, none of the oversampling budget.
    generate = Scripted([f" s{i}" for i in range(30)], {}, default="blue")
    ssr = SSR(SSRConfig(per_task=10, demos=4, shots=2, oversample=3.0, samples=1))
    ssr.after_stage(None, _stage(0, _colors(20), generate))
    assert [len(p) for p, chat, _ in generate.calls] == [10, 10] and ssr.generated == 10

    # A filter that keeps nothing: the budget is written, then it stops.
    generate = Scripted([f" s{i}" for i in range(30)], {}, default="purple")
    ssr = SSR(SSRConfig(per_task=10, demos=4, shots=2, oversample=1.5, samples=1))
    ssr.after_stage(None, _stage(0, _colors(20), generate))
    assert [len(p) for p, chat, _ in generate.calls if not chat] == [10, 5] and ssr.synthetic["colors"] == []


def test_ssr_mixes_synthetic_examples_of_earlier_tasks_only():
    ssr = SSR(SSRConfig(ratio=0.5, per_task=50, demos=2, shots=1, oversample=1.0))
    inputs = [f" synthetic {i}" for i in range(50)]
    ssr.after_stage(None, _stage(0, _colors(10), Scripted(inputs, {}, default="red")))
    assert len(ssr.synthetic["colors"]) == 50

    animals = make_examples("animals", 8)
    mixed = ssr.train_data(_stage(1, animals, None), animals)
    extra = mixed[len(animals) :]
    assert mixed[: len(animals)] == animals and len(extra) == 8  # ratio 0.5: as many as the stage's own
    assert all(e.task == "colors" and e.group.startswith("ssr:") for e in extra)
    assert len(set(extra)) == len(extra)  # without repetition while the pool is large enough

    colors_again = _colors(6)  # a task trained again brings its own data: its synthetic examples stay out
    assert ssr.train_data(_stage(2, colors_again, None), colors_again) == colors_again


def test_ssr_skips_the_runs_last_stage_and_restores_its_state():
    ssr = SSR(SSRConfig(per_task=4, demos=2, shots=1, oversample=1.0))
    ssr.after_stage(None, _stage(0, _colors(6), Scripted([], {}), final=True))
    assert ssr.synthetic == {} and ssr.generated == 0

    inputs = [f" s{i}" for i in range(4)]
    ssr.after_stage(None, _stage(0, _colors(6), Scripted(inputs, {}, default="blue")))
    restored = SSR(ssr.config)
    restored.load_state_dict(ssr.state_dict())
    animals = make_examples("animals", 6)
    assert restored.train_data(_stage(1, animals, None), animals) == ssr.train_data(_stage(1, animals, None), animals)
    assert restored.stats() == ssr.stats() and ssr.stats()["synthetic"] == 4


def test_ssr_on_the_tiny_model_writes_examples_with_the_tasks_template(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    own = _colors(12)
    stage = make_stage(model, tokenizer, 0, own)
    ssr = SSR(SSRConfig(per_task=6, demos=3, shots=2, max_new_tokens=10, known_answers=False))
    ssr.after_stage(model, stage)
    synthetic = ssr.synthetic["colors"]
    assert 0 < len(synthetic) <= 6
    # Rounds: 6 inputs first, more only while fewer than 6 are kept, at most 6 * 1.5 in all.
    assert 6 <= ssr.generated <= 9 and (len(synthetic) == 6 or ssr.generated == 9)
    for e in synthetic:
        assert e.task == "colors" and e.prompt.startswith(HEAD) and e.prompt.endswith(TAIL) and e.answer
        assert e.prompt not in {x.prompt for x in own}


@pytest.mark.parametrize("base_inputs", [True, False])
def test_ssr_writes_inputs_with_the_adapters_off_and_answers_with_them_on(tiny_model_and_tokenizer, base_inputs):
    """``base_inputs`` (the default, the paper's): the inputs are what the base model writes, the answers what
    the trained model answers; off, both come from the trained model. The adapter here is strong enough
    that the two models write different text from the same contexts and seed."""
    model, tokenizer = tiny_model_and_tokenizer
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device))
    own = _colors(12)
    stage = make_stage(model, tokenizer, 0, own)
    real, calls = stage.generate, []

    def recording(model, prompts, max_new_tokens, **kw):
        texts = real(model, prompts, max_new_tokens, **kw)
        calls.append((list(prompts), max_new_tokens, kw, texts))
        return texts

    ssr = SSR(SSRConfig(per_task=6, demos=3, shots=2, max_new_tokens=10, known_answers=False, base_inputs=base_inputs))
    ssr.after_stage(model, dataclasses.replace(stage, generate=recording))

    writing = [c for c in calls if not c[2]["chat"]]
    answering = [c for c in calls if c[2]["chat"]]
    assert writing and answering
    for prompts, n, kw, texts in writing:
        with model.disable_adapter():
            base = real(model, prompts, n, **kw)
        trained = real(model, prompts, n, **kw)
        assert base != trained  # the adapter changes what is written
        assert texts == (base if base_inputs else trained)
    for prompts, n, kw, texts in answering:  # answered by the trained model, adapters on, in either case
        assert texts == real(model, prompts, n, **kw)
    written = [t for *_, texts in writing for t in texts]  # the kept inputs are those texts, cut and wrapped
    assert ssr.synthetic["colors"]
    slot = _Slot.of(own, ssr.demos["colors"])
    assert {e.prompt for e in ssr.synthetic["colors"]} <= set(slot.new_inputs(written, set()))


@pytest.mark.parametrize(
    "args, match",
    [
        ({"shots": 9, "demos": 8}, r"ssr\.shots must be <= ssr\.demos \(8\), got 9"),
        ({"ratio": 0.0}, r"ssr\.ratio must be in \(0, 1\)"),
        ({"temperature": 0.0}, r"ssr\.temperature must be > 0"),
        ({"per_task": 0}, r"ssr\.per_task must be >= 1"),
        ({"oversample": 0.5}, r"ssr\.oversample must be >= 1"),
        ({"samples": 0}, r"ssr\.samples must be >= 1"),
    ],
)
def test_bad_ssr_settings_fail_in_one_line(args, match):
    with pytest.raises(ContinualFTError, match=match) as e:
        build("ssr", {"ssr": args})
    assert "\n" not in str(e.value)
