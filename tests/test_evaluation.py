"""evaluate_task against a plain reference: one full forward per (prompt, label) pair for the choice,
greedy decoding by full forwards (no cache, no batching) for exact match.

The tiny model is trained a little, on answers written as the labels are (``no``, ``maybe not``) and
also as they are not (``Yes``, ``maybe.``), so its greedy answers take every path the evaluation has:
along the label trie to end-of-sequence, off the trie while still able to match (decoded further from
a KV cache), and off any label at once.
"""

from __future__ import annotations

import pytest
import torch

from continual_ft.config import LoraConfig
from continual_ft.data.tasks import Example, Task
from continual_ft.eval.scoring import _predict, evaluate_task, normalize_answer
from continual_ft.model.adapters import start_stage
from continual_ft.model.loading import load_model
from continual_ft.train.batching import Encoder, collate
from continual_ft.train.losses import token_loss

LABELS = ["yes", "no", "maybe", "maybe not"]  # "maybe" is a prefix of "maybe not": they share trie nodes
WRITTEN = {"yes": "Yes", "no": "no", "maybe": "maybe.", "maybe not": "maybe not"}  # the answers trained on


def _examples(n: int, offset: int = 0, written: bool = False) -> list[Example]:
    """Prompts that name the answer, except every third, which names another label (a trap)."""
    out = []
    for i in range(offset, offset + n):
        label = LABELS[(i * 7) % len(LABELS)]
        named = label if i % 3 else LABELS[(i * 7 + 1) % len(LABELS)]
        prompt = f"item {i}: {'word ' * (i % 6)}is it {named}?\n\nAnswer:"
        out.append(Example("toy", prompt, WRITTEN[label] if written else label))
    return out


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama with a LoRA adapter and full fine-tuning of a few steps: non-trivial answers."""
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny", seed=0)
    model = start_stage(model, "continue", 0, LoraConfig())
    encoder = Encoder(tokenizer, 64, chat_template=False)
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = [encoder.encode(e) for e in _examples(24, written=True)]
    for step in range(60):
        batch = collate(train[(step % 3) * 8 : (step % 3) * 8 + 8], tokenizer.pad_token_id)
        summed, n, _ = token_loss(model, batch)
        (summed / n).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    # seen (memorised) and unseen items: some answers right, some wrong
    task = Task("toy", LABELS, [], [], _examples(12) + _examples(18, offset=200))
    return model, encoder, task, reference(model, encoder, task, _max_new_tokens(encoder, task))


@torch.no_grad()
def reference(model, encoder: Encoder, task: Task, max_new_tokens: int):
    """Σ log p per (example, label) by one full forward each; greedy answers by full forwards, cut at EOS."""
    eos = encoder.tokenizer.eos_token_id
    scores, answers = [], []
    for ex in task.test:
        prompt = list(encoder.encode(ex, answer="", eos=False).prompt_ids)
        row = []
        for label in task.labels:
            ids = list(encoder.answer_ids(label, eos=False))
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0].float(), -1)
            row.append(sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(ids)))
        scores.append(row)
        generated = []
        while len(generated) < max_new_tokens:
            token = int(model(input_ids=torch.tensor([prompt + generated])).logits[0, -1].argmax())
            if token == eos:
                break
            generated.append(token)
        answers.append(encoder.tokenizer.decode(generated, skip_special_tokens=True))
    return torch.tensor(scores), answers


def _order(encoder: Encoder, task: Task) -> list[int]:
    lengths = [len(encoder.encode(ex, answer="", eos=False).prompt_ids) for ex in task.test]
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def _max_new_tokens(encoder: Encoder, task: Task) -> int:
    return max(len(encoder.answer_ids(label, eos=False)) for label in task.labels) + 3


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_predictions_equal_reference(trained, batch_size):
    model, encoder, task, (ref_scores, ref_answers) = trained
    scores, answers, _ = _predict(model, encoder, task, _order(encoder, task), batch_size, 0, lambda: torch.no_grad())
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)
    assert torch.equal(scores.argmax(-1), ref_scores.argmax(-1))
    gold = [normalize_answer(ex.answer) for ex in task.test]
    for answer, ref, g in zip(answers, ref_answers, gold):
        # Decoding stops once the match is decided: the answer is the start of the reference's, with the same outcome.
        assert ref.startswith(answer)
        assert (normalize_answer(answer) == g) == (normalize_answer(ref) == g)


def test_scores_equal_reference_and_are_not_trivial(trained):
    model, encoder, task, (ref_scores, ref_answers) = trained
    gold = torch.tensor([task.labels.index(ex.answer) for ex in task.test])
    accuracy = (ref_scores.argmax(-1) == gold).float().mean().item()
    exact = sum(normalize_answer(a) == normalize_answer(ex.answer) for a, ex in zip(ref_answers, task.test))
    score = evaluate_task(model, encoder, task, batch_size=8)
    assert (score.accuracy, score.exact_match, score.n) == (accuracy, exact / len(task.test), len(task.test))
    assert 0 < score.accuracy < 1 and 0 < score.exact_match < 1
    # the fixture's answers take every path: a label read off the trie, a label read on after
    # leaving it ("Yes", "maybe."), and answers that match no label
    read_on = [a for a in ref_answers if normalize_answer(a) in LABELS and a.strip() not in LABELS]
    assert read_on and any(a.strip() in LABELS for a in ref_answers)


def test_eval_mode_restored_and_no_gradients(trained):
    model, encoder, task, _ = trained
    model.train()
    evaluate_task(model, encoder, task)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()


@pytest.mark.parametrize(
    ("text", "settled"),
    [
        ("", False),
        (" ", False),
        ("May", False),
        ("maybe not", False),  # "maybe not." or end-of-sequence may follow
        ("Maybe. ", False),
        ("maybe nothing", True),
        ("yes\nno", True),  # the first line is complete
        ("The answer", True),
        ("yes, ", True),
    ],
)
def test_settled(text, settled, trained):
    from continual_ft.eval.scoring import _Answer

    assert _Answer(trained[1].tokenizer, LABELS).settled(text) is settled
