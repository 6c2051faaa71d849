"""Self-synthesized rehearsal (Huang et al., ACL 2024, https://arxiv.org/abs/2403.01244): replay
examples the model wrote itself, so earlier tasks' training data need not be kept.

After a task's stage only ``demos`` of its real examples are kept (the paper's in-context
demonstrations, a handful where replay keeps a buffer of hundreds); from them the model writes new
inputs, answers them, and those synthetic examples are mixed into later stages as replay mixes its
buffer. For medical or legal data that may not be stored, what persists is ``demos`` examples per task
plus text the model generated.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

from torch import nn

from continual_ft.data.tasks import Example, normalize_answer
from continual_ft.errors import ContinualFTError
from continual_ft.strategies.replay import draw
from continual_ft.train.protocol import StageInfo, Strategy

__all__ = ["SSR", "SSRConfig", "template"]

#: Opens each demonstration in the few-shot context; generation stops where the model opens the next one.
MARK = "### Example"


@dataclass
class SSRConfig:
    per_task: int = field(default=100, metadata={"help": "synthetic examples kept per task (at most)"})
    ratio: float = field(
        default=0.25, metadata={"help": "expected fraction of each batch drawn from the synthetic pool, in (0, 1)"}
    )
    demos: int = field(default=8, metadata={"help": "real examples kept per task, as demonstrations"})
    shots: int = field(default=3, metadata={"help": "demonstrations in each generation prompt (<= demos)"})
    oversample: float = field(
        default=1.5,
        metadata={"help": "inputs written per kept example at most (the filter drops some; written in rounds), >= 1"},
    )
    samples: int = field(
        default=3,
        metadata={"help": "inputs written from each few-shot context, sharing its prefill (1: new demos per input)"},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "longest generated input, in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature for the inputs, > 0"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass for the inputs, in (0, 1]"})
    base_inputs: bool = field(
        default=True,
        metadata={"help": "write inputs with the adapters disabled (the paper's base model); false: the trained model"},
    )
    known_answers: bool = field(
        default=True,
        metadata={"help": "keep a synthetic example only if its answer is one the task's training examples use"},
    )
    batch_size: int = field(default=64, metadata={"help": "prompts generated together"})
    seed: int = field(default=0, metadata={"help": "seed for the demonstrations, the sampling and the draw"})

    def __post_init__(self):
        for name in ("per_task", "demos", "shots", "samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ContinualFTError(f"ssr.{name} must be >= 1, got {getattr(self, name)}")
        if self.shots > self.demos:
            raise ContinualFTError(f"ssr.shots must be <= ssr.demos ({self.demos}), got {self.shots}")
        if not 0 < self.ratio < 1:
            raise ContinualFTError(f"ssr.ratio must be in (0, 1), got {self.ratio}")
        if self.oversample < 1:
            raise ContinualFTError(f"ssr.oversample must be >= 1, got {self.oversample}")
        if not self.temperature > 0:
            raise ContinualFTError(f"ssr.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ContinualFTError(f"ssr.top_p must be in (0, 1], got {self.top_p}")


def template(prompts: list[str]) -> tuple[str, str]:
    """The text every prompt starts and ends with (a task's instruction and answer cue): what the model
    is not asked to write. Cut at line breaks so the variable part is whole lines of its own."""
    head = os.path.commonprefix(prompts)
    head = head[: head.rfind("\n") + 1]
    tail = os.path.commonprefix([p[len(head) :][::-1] for p in prompts])[::-1]
    tail = tail[tail.find("\n") :] if "\n" in tail else ""
    return head, tail


def _seed(seed: int, stage: int, task: str) -> int:
    """A 63-bit seed from (seed, stage, task), the same in every process and every run (unlike ``hash``)."""
    return random.Random(f"{seed}:{stage}:{task}").getrandbits(63)


def _pick_demos(examples: list[Example], k: int, rng: random.Random) -> list[Example]:
    """``k`` examples covering as many answers as possible: round-robin over the answers in random order."""
    by_answer: dict[str, list[Example]] = {}
    for e in rng.sample(examples, len(examples)):
        by_answer.setdefault(e.answer, []).append(e)
    queues = [by_answer[a] for a in rng.sample(sorted(by_answer), len(by_answer))]
    picked = []
    while len(picked) < k and any(queues):
        for q in queues:
            if q and len(picked) < k:
                picked.append(q.pop())
    return picked


@dataclass
class _Slot:
    """How a task's inputs sit in its prompts, and the few-shot contexts that ask for new ones.

    ``head`` and ``tail`` are the instruction and answer cue every prompt shares (:func:`template`),
    ``bodies`` the demonstrations' inputs between them. ``lead``, what every body opens with
    ("Diagnosis:"), opens the slot the model writes in, so it writes in that format; ``ends`` stop the
    writing where the model opens the next example, or at a blank line for single-paragraph inputs (where
    a small model otherwise goes on writing unrelated text).
    """

    head: str
    tail: str
    bodies: list[str]
    lead: str
    ends: list[str]

    @classmethod
    def of(cls, own: list[Example], demos: list[Example]) -> _Slot:
        head, tail = template([e.prompt for e in own])
        bodies = [e.prompt[len(head) : len(e.prompt) - len(tail)].strip() for e in demos]
        lead = os.path.commonprefix(bodies)
        lead = lead[: lead.rfind(" ") + 1].rstrip()  # "Diagnosis:": the model writes the space with its next word
        ends = [MARK] + ([] if any("\n\n" in b for b in bodies) else ["\n\n"])
        return cls(head, tail, bodies, lead, ends)

    def context(self, rng: random.Random, shots: int) -> str:
        """The instruction, ``shots`` demonstrations in random order, numbered, then the open slot."""
        picked = rng.sample(self.bodies, min(shots, len(self.bodies)))
        shown = "".join(f"{MARK} {i}\n{b}\n\n" for i, b in enumerate(picked, 1))
        return f"{self.head}{shown}{MARK} {len(picked) + 1}\n{self.lead}"

    def new_inputs(self, texts: list[str], seen: set[str]) -> list[str]:
        """Written texts cut at their end and wrapped as prompts, without empty ones and without any in
        ``seen`` (the demonstrations, earlier inputs), which they are added to."""
        inputs = []
        for text in texts:
            for end in self.ends:
                text = text.split(end)[0]
            body = (self.lead + text).strip()
            if text.strip() and body not in seen:
                seen.add(body)
                inputs.append(self.head + body + self.tail)
        return inputs


class SSR(Strategy):
    """Rehearse earlier tasks on examples the model synthesised. After the stage of task t:

    1. keep ``demos`` of its training examples D_t (covering as many answers as possible);
    2. **inputs**: the base model (adapters disabled) continues a few-shot context of ``shots`` of them,
       shuffled per context, and writes ``samples`` new inputs x̃ from each context (temperature / top-p
       sampling, the context's prefill shared), opened with what
       every demonstration's input opens with and ended at the next example (or blank line, for
       single-paragraph inputs); the task's shared instruction and answer cue (:func:`template`) wrap it;
    3. **outputs**: the model just trained on t answers each x̃ greedily, ỹ = argmax p_θt(y | x̃), as it
       answers at evaluation;
    4. **selection**: drop empty and repeated inputs, copies of a demonstration, and (``known_answers``)
       answers that no example in D_t has; keep ``per_task``.

    Steps 2–4 run in rounds: ``per_task`` inputs first, then the shortfall divided by the share kept
    so far, until ``per_task`` are kept or ``per_task · oversample`` inputs are written.

    Stage k then trains on its own n examples plus m = round(ratio / (1 − ratio) · n) drawn from the
    synthetic examples of every earlier task, as :class:`Replay` draws its buffer. A task that comes
    back later is synthesised again from its new stage.

    Differences from the paper, kept simple on purpose: its step 3 re-answers every task's inputs with
    the latest model before each stage, and its selection clusters the candidates (K-means on
    embeddings) for diversity; here each task is answered once by the model that has just learned it,
    and diversity comes from sampling with shuffled demonstrations.
    """

    name = "ssr"
    summary = "Rehearse earlier tasks on examples the model synthesised itself from a few kept demonstrations."
    uses_model = True  # generates with the model: every process runs the same prompts with the same seed

    def __init__(self, config: SSRConfig | None = None):
        self.config = config or SSRConfig()
        self.demos: dict[str, list[Example]] = {}
        self.synthetic: dict[str, list[Example]] = {}
        self.generated = 0  # candidates written so far, before selection
        self.seconds = 0.0  # time spent generating

    def _rng(self, purpose: str, stage: StageInfo) -> random.Random:
        return random.Random(f"{self.config.seed}:{purpose}:{stage.index}")

    @property
    def pool(self) -> list[Example]:
        return [e for task in self.synthetic for e in self.synthetic[task]]

    def train_data(self, stage: StageInfo, examples: list[Example]) -> list[Example]:
        pool = [e for e in self.pool if e.task not in stage.tasks]  # a task trained again brings its own data
        if not pool:
            return examples
        ratio = self.config.ratio
        return examples + draw(pool, round(ratio / (1 - ratio) * len(examples)), self._rng("mix", stage))

    def after_stage(self, model: nn.Module, stage: StageInfo) -> None:
        if stage.final:  # nothing trains after the run's last stage
            return
        if stage.generate is None:
            raise ContinualFTError("strategy=ssr needs a loop that gives strategies stage.generate")
        start = time.perf_counter()
        for task in stage.tasks:
            own = [e for e in stage.examples if e.task == task]
            self.demos[task] = _pick_demos(own, self.config.demos, self._rng(f"demos:{task}", stage))
            self.synthetic[task] = self._synthesise(model, stage, task, own)
        self.seconds += time.perf_counter() - start

    def _synthesise(self, model: nn.Module, stage: StageInfo, task: str, own: list[Example]) -> list[Example]:
        c = self.config
        slot = _Slot.of(own, self.demos[task])
        rng = self._rng(f"shots:{task}", stage)
        budget = math.ceil(c.per_task * c.oversample)
        known = {normalize_answer(e.answer): e.answer for e in own}  # answers as evaluation reads them
        free = task in stage.generative  # a generative task's answers are free text: kept as written
        seen, kept, written, round_ = set(slot.bodies), [], 0, 0
        # In rounds until per_task are kept or the budget is written: the filter keeps most inputs, so
        # writing and answering the whole budget at once did up to a third of the work for nothing.
        while len(kept) < c.per_task and written < budget:
            if not written:
                n = c.per_task
            elif kept:  # the shortfall over the share of the written inputs kept so far
                n = math.ceil((c.per_task - len(kept)) * written / len(kept))
            else:
                n = budget
            contexts = [slot.context(rng, c.shots) for _ in range(math.ceil(min(n, budget - written) / c.samples))]
            seed = _seed(c.seed, stage.index, task if not round_ else f"{task}:{round_}")
            texts = self._write(model, stage, contexts, slot.ends, seed)
            written += len(contexts) * c.samples
            round_ += 1
            kept += self._answer(model, stage, task, slot.new_inputs(texts, seen), known, first=len(kept), free=free)
        self.generated += written
        return kept[: c.per_task]

    def _write(self, model: nn.Module, stage: StageInfo, contexts: list[str], ends: list[str], seed: int) -> list[str]:
        """``samples`` continuations of each context, sampled; by the base model (PEFT's ``disable_adapter``;
        a model without adapters is its own base) unless ``base_inputs`` is off."""
        c = self.config
        base = model.disable_adapter() if c.base_inputs and hasattr(model, "disable_adapter") else nullcontext()
        with base:
            return stage.generate(
                model,
                contexts,
                c.max_new_tokens,
                chat=False,
                temperature=c.temperature,
                top_p=c.top_p,
                seed=seed,
                stop=ends,
                batch_size=c.batch_size,
                samples=c.samples,
            )

    def _answer(
        self,
        model: nn.Module,
        stage: StageInfo,
        task: str,
        inputs: list[str],
        known: dict[str, str],
        first: int,
        free: bool = False,
    ) -> list[Example]:
        """The trained model's greedy answers to ``inputs``, read as evaluation reads them (first line, case
        and a final period ignored: the keys of ``known``, the task's answers); with ``known_answers`` only
        those that are one of the task's answers. ``free`` (a generative task): every non-empty answer, as written."""
        longest = max(len(a) for a in known)  # in characters: at least as many tokens as the longest answer
        answers = stage.generate(model, inputs, longest + 2, chat=True, stop=["\n"], batch_size=self.config.batch_size)
        kept = []
        for x, y in zip(inputs, answers):
            if free:
                answer = y.strip().split("\n")[0].strip()
            else:
                answer = known.get(normalize_answer(y), None if self.config.known_answers else y.strip())
            if answer:
                kept.append(Example(task, x, answer, f"ssr:{task}:{stage.index}:{first + len(kept)}"))
        return kept

    def state_dict(self) -> dict:
        return {
            "demos": {t: [asdict(e) for e in es] for t, es in self.demos.items()},
            "synthetic": {t: [asdict(e) for e in es] for t, es in self.synthetic.items()},
            "generated": self.generated,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self.demos = {t: [Example(**e) for e in es] for t, es in state["demos"].items()}
        self.synthetic = {t: [Example(**e) for e in es] for t, es in state["synthetic"].items()}
        self.generated = int(state["generated"])
        self.seconds = float(state["seconds"])

    def stats(self) -> dict[str, float]:
        kept = len(self.pool)
        return {
            "synthetic": kept,
            "kept_fraction": kept / self.generated if self.generated else 0.0,
            "generate_seconds": self.seconds,
        }
