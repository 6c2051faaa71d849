"""The strategy protocol: what a strategy is (its hooks and capabilities), what it sees of a stage, and the
one order its hooks run in, whatever loop trains the stage.

Every loop calls the functions below, one per hook over the list of strategies: our trainer
(:mod:`continual_ft.train.loop`), the HF ``Trainer`` (:mod:`continual_ft.integrations.hf_trainer`), the
hand-written loop in ``examples/plain_loop.py`` and the Avalanche plugin
(:mod:`continual_ft.integrations.avalanche`, at Avalanche's events)::

    refuse(strategies, Loop("this loop"))              # before anything trains: a hook it cannot call
    batches = Batches(encoder, batch_size=8, device=device, autocast=autocast)
    stage = stage_info(i, tasks, own_examples, batches, final=i == last)
    done = run_stage(model, stage, strategies, train)   # train(examples) does the optimizer steps
    ...
    loss = task_loss + total_penalty(strategies, model, batch, outputs)   # inside train, every micro-batch
    after_backward(strategies, model, stage, step)   # inside train, every step, before clipping and stepping

:func:`run_stage` is the order of a stage (Avalanche's ``BaseTemplate.train`` keeps it in one place too)::

    examples = train_data(strategies, stage, examples)   each strategy in turn (replay mixes in its buffer)
    before_stage(strategies, model, stage)               (LwF snapshots its teacher)
    train(examples)                                       penalty every micro-batch, after_backward every step
    after_stage(strategies, model, stage)                (EWC's Fisher, replay fills its buffer)

The model must already carry the stage's adapter (:func:`continual_ft.model.adapters.start_stage`).

What ``strategy=`` names is a :class:`Method`: a :class:`Strategy` (hooks, which every loop calls) or a
:class:`StageLoop` (a training loop of its own, Avalanche's: ``strategy=avalanche:ewc``), which trains the
stage in place of ours (:func:`training_loop`) and which loops that only call hooks refuse.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from torch import nn

from continual_ft.data.tasks import Example
from continual_ft.errors import ContinualFTError
from continual_ft.train.batching import Encoder, collate, length_grouped_batches, to_device
from continual_ft.train.generation import sample
from continual_ft.train.losses import mean_token_loss

if TYPE_CHECKING:
    from continual_ft.config import RunConfig

__all__ = [
    "HOOKS",
    "STAGE_HOOKS",
    "StageInfo",
    "Method",
    "Strategy",
    "StageLoop",
    "Loop",
    "Batches",
    "StageRun",
    "stage_info",
    "needed_hooks",
    "refuse",
    "training_loop",
    "train_data",
    "before_stage",
    "total_penalty",
    "after_backward",
    "after_stage",
    "run_stage",
]

#: Every hook, in the order they first run in a stage.
HOOKS = ("train_data", "before_stage", "penalty", "after_backward", "after_stage")
#: The hooks around the optimizer steps: any loop can call them (:func:`run_stage` does), even one without
#: a place between a backward and its optimizer step.
STAGE_HOOKS = ("train_data", "before_stage", "after_stage")


@dataclass
class StageInfo:
    """What a strategy may know about the stage at hand."""

    index: int  # 0-based stage number
    tasks: list[str]  # task names trained in this stage
    examples: list[Example]  # this stage's own training examples (before any strategy adds to them)
    batches: Callable[[list[Example]], Iterable[dict]] = field(repr=False)  # examples -> tokenized batches
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] = field(repr=False)  # mean answer-token loss of a batch
    # (model, prompts, max_new_tokens, *, chat, temperature, top_p, seed) -> the model's text after each
    # prompt (:meth:`Batches.generate`): self-synthesized rehearsal writes its examples with it.
    generate: Callable[..., list[str]] | None = field(default=None, repr=False)
    final: bool = False  # no stage follows in this run: work only later stages use (EWC's Fisher) can be skipped
    # Sums a tensor over the processes of a multi-process run (identity in one process): a strategy
    # that accumulates over ``batches`` (each process gets its share of them) totals it with this.
    # Under FSDP each process gets every batch (a backward there averages the processes' gradients) and
    # this is the identity too.
    sum_across: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t, repr=False)
    # The stage's generative tasks (``type: generate``): their answers are free text, not one of a few labels
    # (self-synthesized rehearsal keeps the answers the model writes for them instead of matching a label).
    generative: frozenset[str] = frozenset()


class Method:
    """What ``strategy=`` names: its settings, the checks and state it brings, and what it can run under.

    Not subclassed directly: a method is a :class:`Strategy` (hooks every loop calls) or a :class:`StageLoop`
    (a loop of its own). Every attribute here is a capability the runner and its checks read as declared,
    never by probing the object.
    """

    #: The name ``strategy=`` takes (``"replay"``), under which the runner saves the state and statistics.
    name = "base"
    #: One sentence, ending with a period, that ``python cli.py list`` prints whole.
    summary = ""
    #: Its settings, a dataclass (``ReplayConfig``): ``config.yaml`` records them, defaults included.
    config: Any = None
    #: Whether it reads the model's parameters or runs the model (EWC's Fisher, LwF's teacher). Under
    #: FSDP parameters are per-rank shards: methods that set this False (they pick data) run there as
    #: they are, the others only if they set ``handles_shards`` (EWC, LwF).
    uses_model = True
    #: Whether it works on FSDP2's DTensor shards and keeps a run equal to one process (docs/distributed.md).
    handles_shards = False
    #: The adapter modes (``adapter=``, :data:`continual_ft.model.adapters.ADAPTER_MODES`) in which it does
    #: what its name says; ``None``: every mode (a strategy that only picks data). In any other mode
    #: ``check_config`` stops the run before anything is written with
    #: ``strategy=<name> needs adapter=<these>: <adapter_refusal>``
    #: (the table in docs/strategies.md says which strategy acts in which mode, and the test that shows it).
    adapter_modes: tuple[str, ...] | None = None
    #: Why it does nothing of its own in the other modes, one clause; ``{adapter}`` is the mode refused.
    adapter_refusal = ""

    def check_run(self, config: RunConfig) -> None:
        """Refuse, with one line, a run configuration it cannot serve (beyond ``adapter_modes``), before a run
        directory is made: ``check_config`` calls it. Default: every configuration."""

    def state_dict(self) -> dict:
        """Everything needed to resume it later (tensors and plain Python); saved after every stage."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (``resume``)."""

    def stats(self) -> dict[str, float]:
        """Numbers of its own worth tracking after a stage (replay's buffer size); default none."""
        return {}


class Strategy(Method):
    """A method made of hooks, every one a no-op here: a strategy overrides only what it needs, and a loop
    that cannot call a hook it overrides refuses it up front (:func:`refuse`).

    A strategy needs only the model, the stage's data and a loss function; it never reads trainer
    internals, so the same object works in our trainer, a hand-written PyTorch loop
    (``examples/plain_loop.py``), the Hugging Face ``Trainer`` and an Avalanche strategy. Hook order:
    :func:`run_stage`.
    """

    def train_data(self, stage: StageInfo, examples: list[Example]) -> list[Example]:
        """The examples to train on in this stage, given what the strategies before it chose (at first the
        stage's own); default: those. Called once, before :meth:`before_stage` (replay mixes in its buffer)."""
        return examples

    def before_stage(self, model: nn.Module, stage: StageInfo) -> None:
        """Called once before the stage's first step, with the stage's adapter in place (LwF snapshots its
        teacher)."""

    def penalty(self, model: nn.Module, batch: dict, outputs: Any) -> torch.Tensor | None:
        """An extra loss term added to the task loss of every training micro-batch (``outputs``: the model's
        on ``batch``), or None; its gradient flows with the task loss's (EWC, LwF, O-LoRA)."""
        return None

    def after_backward(self, model: nn.Module, stage: StageInfo, step: int) -> None:
        """Called once per optimizer step (``step``, 1-based within the stage) when its gradients are complete:
        after the last micro-batch's backward (and, with several processes, their all-reduce), before
        clipping and the optimizer step. A strategy may change the parameters' ``.grad`` here (A-GEM)."""

    def after_stage(self, model: nn.Module, stage: StageInfo) -> None:
        """Called once after a stage's last step (with the best weights restored), before the runner saves,
        merges or evaluates (EWC's Fisher, replay fills its buffer)."""

    @property
    def needs_global_batch(self) -> str:
        """The setting under which its ``penalty`` picks rows by their place in the step's global batch, as
        ``key=value`` (LwF: ``lwf.fraction=0.5``); ``""`` (the default): it acts on each batch as it comes.
        Our loop tags a process's share with that place (:func:`continual_ft.train.batching.in_global_batch`);
        a loop over several processes whose batches don't carry it refuses the strategy (:func:`refuse`)."""
        return ""


class StageLoop(Method):
    """A method that is a training loop of its own: it trains a stage in place of ours
    (:func:`training_loop`), with its own mechanisms, not our hooks (Avalanche's strategies,
    :mod:`continual_ft.integrations.avalanche_loops`). It runs alone: the hooks of strategies beside it
    would never be called, so :meth:`check_run` refuses ``strategy=avalanche:ewc+replay``, and loops that
    only call hooks refuse it (:func:`refuse`)."""

    def check_run(self, config: RunConfig) -> None:
        """Refuse a run that names another method beside it."""
        if "+" in config.strategy:
            raise ContinualFTError(
                f"strategy={self.name} runs alone: it trains in a loop of its own, which calls no hooks of the "
                "strategies beside it"
            )

    def train_stage(self, model, encoder: Encoder, examples, validation, cfg, strategies=(), stage=None, **kw):
        """Train one stage: the signature and result of our :func:`continual_ft.train.loop.train_stage`."""
        raise NotImplementedError


@dataclass(frozen=True)
class Loop:
    """A loop that trains through the hooks, as :func:`refuse` checks the strategies against it."""

    name: str  # as a refusal names it: "the HF Trainer over 2 processes"
    instead: str  # what to do instead, the refusal's last clause: "use cli.py run (DDP)"
    hooks: tuple[str, ...] = HOOKS  # the hooks it calls as one process with the whole batch would
    global_batch: bool = True  # its batches carry their place in the step's global batch (or are it whole)


T = TypeVar("T")


def _identity(x):
    return x


@dataclass
class Batches:
    """How a strategy runs the model over examples (EWC's Fisher): deterministic, length-sorted batches,
    and their mean answer-token loss under ``autocast``.

    ``device=None`` leaves batches on the CPU and moves each to the model's device in :meth:`loss`
    (the HF ``Trainer`` places the model only when training starts). ``shard`` picks this process's
    share of the batches when several processes train together (:mod:`continual_ft.train.distributed`).
    """

    encoder: Encoder
    batch_size: int = 8
    device: torch.device | None = None
    autocast: Callable = nullcontext
    shard: Callable[[list], list] = _identity

    def __call__(self, examples: Sequence[Example]) -> Iterator[dict]:
        encoded = [self.encoder.encode(e) for e in examples]
        pad = self.encoder.tokenizer.pad_token_id
        for items in self.shard(list(length_grouped_batches(encoded, self.batch_size, rng=None))):
            batch = collate(items, pad)
            yield batch if self.device is None else to_device(batch, self.device)

    def loss(self, model, batch: dict) -> torch.Tensor:
        if self.device is None:
            batch = to_device(batch, next(model.parameters()).device)
        with self.autocast():
            return mean_token_loss(model, batch)

    @torch.no_grad()
    def generate(
        self,
        model,
        prompts: Sequence[str],
        max_new_tokens: int,
        *,
        chat: bool = True,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        batch_size: int | None = None,
        samples: int = 1,
    ) -> list[str]:
        """The model's text after each prompt (self-synthesized rehearsal writes examples with it):
        ``samples`` texts per prompt, in prompt order, drawn from one prefill of it.

        ``chat=True`` formats a prompt as training does (the chat template where the model has one);
        ``False`` feeds the text as it is (a few-shot context to continue). Greedy at ``temperature=0``,
        else sampled (nucleus ``top_p``) from a generator seeded with ``seed`` inside ``fork_rng``, so
        the run's own random state is untouched and a resumed run samples the same text. In eval mode;
        the model's mode is restored. Every process runs every prompt (no ``shard``). A row stops at
        end of text or once its text contains one of ``stop`` (which stays in the text), and leaves the
        batch then (:func:`continual_ft.train.generation.sample`). ``batch_size`` prompts of similar length go
        through together (default: this object's): decoding reads every weight per token, so a batch
        larger than training's costs little more per step.
        """
        tok = self.encoder.tokenizer
        device = self.device or next(model.parameters()).device
        rows = [tok(self.encoder.prompt_text(p) if chat else p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # little padding in each batch
        size = batch_size or self.batch_size
        texts: list[str] = [""] * (len(rows) * samples)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), self.autocast():
                torch.manual_seed(seed)
                for start in range(0, len(order), size):
                    chunk = order[start : start + size]
                    new = sample(
                        model,
                        [rows[i] for i in chunk],
                        max_new_tokens,
                        tokenizer=tok,
                        temperature=temperature,
                        top_p=top_p,
                        stop=stop,
                        samples=samples,
                    )
                    for j, ids in enumerate(new):
                        texts[chunk[j // samples] * samples + j % samples] = tok.decode(ids, skip_special_tokens=True)
        finally:
            model.train(was_training)
        return texts


def stage_info(
    index: int,
    tasks: Sequence[str],
    examples: Sequence[Example],
    batches: Batches,
    *,
    final: bool = False,
    sum_across: Callable[[torch.Tensor], torch.Tensor] = _identity,
    generative: Iterable[str] = (),
) -> StageInfo:
    """The :class:`StageInfo` strategies see; ``sum_across`` sums a tensor over processes (identity in one);
    ``generative``: the stage's tasks of ``type: generate``."""
    return StageInfo(
        index=index,
        tasks=list(tasks),
        examples=list(examples),
        batches=batches,
        loss_fn=batches.loss,
        generate=batches.generate,
        final=final,
        sum_across=sum_across,
        generative=frozenset(generative),
    )


def needed_hooks(strategy: Method) -> tuple[str, ...]:
    """The hooks ``strategy`` overrides (in :data:`HOOKS` order): those a loop must call for it to act.
    A :class:`StageLoop` needs none: it is a loop."""
    if not isinstance(strategy, Strategy):
        return ()
    mro = type(strategy).__mro__
    own = {name for cls in mro[: mro.index(Strategy)] for name in vars(cls)}
    return tuple(h for h in HOOKS if h in own)


def refuse(strategies: Sequence[Method], loop: Loop) -> None:
    """Stop before anything trains, with one line, where ``loop`` cannot run a strategy as it needs: a
    :class:`StageLoop` (a hooks-only loop would train it as naive), a hook the strategy overrides that the loop
    does not call, or rows picked by their place in a global batch the loop's batches don't carry."""
    for s in strategies:
        if isinstance(s, StageLoop):
            raise ContinualFTError(
                f"strategy={s.name} trains in a loop of its own, not through hooks: {loop.name} would train it "
                f"as naive; {loop.instead}"
            )
        missing = [h for h in needed_hooks(s) if h not in loop.hooks]
        if missing:
            raise ContinualFTError(
                f"strategy={s.name} needs its {missing[0]} hook, which {loop.name} cannot call; {loop.instead}"
            )
        if s.needs_global_batch and not loop.global_batch:
            raise ContinualFTError(
                f"strategy={s.name} with {s.needs_global_batch} and {loop.name} would act on other rows than one "
                f"process (its batches don't carry their place in the global batch): change "
                f"{s.needs_global_batch.split('=')[0]}, or {loop.instead}"
            )


def training_loop(methods: Sequence[Method], ours: Callable) -> Callable:
    """What trains a stage: the ``train_stage`` of the :class:`StageLoop` among ``methods``, else ``ours``
    (:func:`continual_ft.train.loop.train_stage`, which calls the strategies' hooks)."""
    return next((m.train_stage for m in methods if isinstance(m, StageLoop)), ours)


def _strategies(methods: Sequence[Method]) -> list[Strategy]:
    # A StageLoop in the list (the runner's methods) has no hooks: it trains the stage itself.
    return [s for s in methods if isinstance(s, Strategy)]


def train_data(strategies: Sequence[Method], stage: StageInfo, examples: Sequence[Example]) -> list[Example]:
    """Each strategy's ``train_data`` in order, each given what the one before chose; first ``examples``."""
    examples = list(examples)
    for s in _strategies(strategies):
        examples = s.train_data(stage, examples)
    return examples


def before_stage(strategies: Sequence[Method], model, stage: StageInfo) -> None:
    """Each strategy's ``before_stage`` in order, once, before the stage's first step."""
    for s in _strategies(strategies):
        s.before_stage(model, stage)


def total_penalty(strategies: Sequence[Method], model, batch: dict, outputs) -> torch.Tensor | None:
    """Σ_s penalty_s(model, batch, outputs) over the strategies that return one; None if none does.
    Called every training micro-batch; the loop adds it to the task loss before the backward."""
    total = None
    for s in _strategies(strategies):
        extra = s.penalty(model, batch, outputs)
        if extra is not None:
            total = extra if total is None else total + extra
    return total


def after_backward(strategies: Sequence[Method], model, stage: StageInfo | None, step: int) -> None:
    """Each strategy's ``after_backward`` in order, once the step's gradients are complete (``step`` 1-based),
    before clipping and the optimizer step."""
    for s in _strategies(strategies):
        s.after_backward(model, stage, step)


def after_stage(strategies: Sequence[Method], model, stage: StageInfo) -> None:
    """Each strategy's ``after_stage`` in order, once, after the stage's last step."""
    for s in _strategies(strategies):
        s.after_stage(model, stage)


@dataclass
class StageRun(Generic[T]):
    """What :func:`run_stage` hands back: the loop's own result and what the strategies cost."""

    result: T
    examples: int  # examples trained on, after every strategy's train_data
    hook_seconds: float  # train_data, before_stage and after_stage together (EWC's Fisher pass is here)


def run_stage(
    model,
    stage: StageInfo,
    strategies: Sequence[Method],
    train: Callable[[list[Example]], T],
    examples: Sequence[Example] | None = None,
) -> StageRun[T]:
    """train_data → before_stage → ``train(examples)`` → after_stage, timing the hooks apart from training.

    ``train`` does the optimizer steps, calling :func:`total_penalty` every micro-batch and
    :func:`after_backward` every step. ``examples``: what the strategies' ``train_data`` starts from (default:
    the stage's own examples).
    """
    start = time.perf_counter()
    examples = train_data(strategies, stage, stage.examples if examples is None else examples)
    before_stage(strategies, model, stage)
    hooks = time.perf_counter() - start
    result = train(examples)
    start = time.perf_counter()
    after_stage(strategies, model, stage)
    hooks += time.perf_counter() - start
    return StageRun(result, len(examples), hooks)
