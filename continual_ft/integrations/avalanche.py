"""Avalanche, both ways: our scenarios as Avalanche benchmarks, Avalanche's strategies on our model and
data (their loops: :mod:`continual_ft.integrations.avalanche_loops`), and our strategies as Avalanche
plugins. Avalanche is imported only when one of these is used.

How a causal LM fits Avalanche's stock strategies unchanged: a mini-batch is ``[x, y, t]`` as for an
image classifier. ``x`` is our batch (:func:`continual_ft.train.batching.collate`, a dict that moves with
``.to(device)``), ``y`` the answer-token targets flattened to one row per answer position (``-100`` on
padding), ``t`` the task labels. :class:`CausalLMClassifier` maps ``x`` to one row of vocabulary
logits per answer position, so Avalanche's default ``CrossEntropyLoss()`` (``ignore_index=-100``) is
our mean answer-token loss, and plugins that call ``model(batch[0])`` and ``criterion(out, batch[1])``
themselves (EWC's importances) work as they do on images. Avalanche's own NLP example
(``examples/nlp.py``) overrides ``mb_x``/``forward``/``criterion`` in a template subclass instead;
EWC's importance pass bypasses those overrides, so we keep the batch in the shape every plugin reads.

    bm = benchmark(load_scenario("legal_then_medical"), encoder)     # 1. a CLScenario, one experience per stage
    cl = avalanche.training.EWC(model=CausalLMClassifier(lm), optimizer=..., criterion=CrossEntropyLoss(),
                                ewc_lambda=..., plugins=[StrategyPlugin(Replay(), encoder)])   # 3. ours inside
    for exp in bm.train_stream: cl.train(exp)
    python cli.py run strategy=avalanche:ewc                                                   # 2. in our runner
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import Dataset

from continual_ft.data.tasks import Example
from continual_ft.errors import ContinualFTError
from continual_ft.train import protocol
from continual_ft.train.batching import Encoder, collate
from continual_ft.train.losses import model_inputs

__all__ = [
    "INSTALL",
    "require_avalanche",
    "Batch",
    "Collate",
    "examples_dataset",
    "benchmark",
    "CausalLMClassifier",
    "StrategyPlugin",  # noqa: F822 (made on first access by __getattr__: Avalanche is optional)
    "experience",
    "task_ids",
    "run_experience",
]

INSTALL = (
    'pip install "continual-ft[avalanche]" (it pulls torchvision and the torch build torchvision is made for, '
    "not a +cpu one; bash scripts/install_avalanche.sh makes .venv-avalanche)"
)


def require_avalanche(what: str = "this") -> None:
    """Import Avalanche, or stop with one line naming the install."""
    try:
        import avalanche  # noqa: F401
    except ImportError as e:
        raise ContinualFTError(f"{what} needs avalanche-lib ({e}): {INSTALL}") from None


class Batch(dict):
    """Our collated batch as Avalanche's ``mb_x``: a dict that ``_unpack_minibatch`` can move with ``.to``."""

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch({k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in self.items()})


class _Items(Dataset):
    """Examples encoded once; an item is a fresh dict (Avalanche adds its task label to it)."""

    def __init__(self, examples: Sequence[Example], encoder: Encoder):
        self.examples = list(examples)
        self.encoded = [encoder.encode(e) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {"encoded": self.encoded[i], "example": self.examples[i]}


class Collate:
    """Items → ``[x, y, t]``: x our :class:`Batch`, y its answer targets flattened, t the task labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> list:
        batch = Batch(collate([it["encoded"] for it in items], self.pad_id))
        t = torch.tensor([it["targets_task_labels"] for it in items])
        return [batch, batch["labels"].reshape(-1), t]


def examples_dataset(examples: Sequence[Example], encoder: Encoder, task_ids: dict[str, int]):
    """An Avalanche classification dataset of tokenized examples with task labels.

    ``targets`` (the class Avalanche's LwF distils over) is each answer's first token id: the token
    that tells one label from another.
    """
    from avalanche.benchmarks.utils import DataAttribute, TaskLabels
    from avalanche.benchmarks.utils.classification_dataset import TaskAwareSupervisedClassificationDataset

    items = _Items(examples, encoder)
    targets = [e.answer_ids[0] for e in items.encoded]
    return TaskAwareSupervisedClassificationDataset(
        [items],
        data_attributes=[DataAttribute(targets, "targets"), TaskLabels([task_ids[e.task] for e in items.examples])],
        collate_fn=Collate(encoder.tokenizer.pad_token_id),
    )


def task_ids(scenario) -> dict[str, int]:
    """Task label of each task: the order in which tasks first appear in the stream of stages."""
    order = dict.fromkeys(t for stage in scenario.stages for t in stage.tasks)
    return {t: i for i, t in enumerate(order)}


def benchmark(scenario, encoder: Encoder):
    """Our scenario as an Avalanche ``CLScenario``: one experience per stage in ``train_stream`` and
    ``test_stream`` (and ``valid_stream`` when every task has validation examples), holding the stage's
    tasks' tokenized examples with their task labels (:func:`task_ids`)."""
    require_avalanche("benchmark()")
    from avalanche.benchmarks import benchmark_from_datasets, with_task_labels

    ids = task_ids(scenario)
    splits = {"train": "train", "test": "test"}
    if all(task.validation for task in scenario.tasks.values()):
        splits["valid"] = "validation"  # Avalanche's name for the stream, ours for the split
    streams = {
        stream: [
            examples_dataset([e for t in stage.tasks for e in getattr(scenario.tasks[t], split)], encoder, ids)
            for stage in scenario.stages
        ]
        for stream, split in splits.items()
    }
    return with_task_labels(benchmark_from_datasets(**streams))


def experience(examples: Sequence[Example], encoder: Encoder, ids: dict[str, int], index: int):
    """One Avalanche experience of ``examples`` (task labels from ``ids``): what :func:`benchmark` holds per stage."""
    from avalanche.benchmarks import with_task_labels
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience

    data = examples_dataset(examples, encoder, ids)
    return with_task_labels(DatasetExperience(dataset=data, current_experience=index))


class _Last:
    """The latest model outputs, and the autocast factory. Avalanche's LwF deep-copies the model: a copy
    starts without outputs (a tensor in a graph cannot be deep-copied) and shares the factory (a bound
    method would drag its whole object into the copy)."""

    def __init__(self, autocast: Callable):
        self.autocast, self.outputs = autocast, None

    def __deepcopy__(self, memo):
        return _Last(self.autocast)


class CausalLMClassifier(nn.Module):
    """A causal LM as Avalanche sees a classifier: ``forward(x)`` gives one row of vocabulary logits per
    answer position, ``(batch × answer positions, vocab)``, in fp32, aligned with ``y``.

    The forward runs under ``autocast``; ``last_outputs`` keeps the model's own outputs of the latest
    call for :class:`StrategyPlugin` (our penalties read ``outputs.logits``).
    """

    def __init__(self, lm: nn.Module, autocast: Callable = nullcontext):
        super().__init__()
        self.lm = lm
        self._last = _Last(autocast)

    @property
    def autocast(self) -> Callable:
        return self._last.autocast

    @property
    def last_outputs(self):
        return self._last.outputs

    def forward(self, x: dict) -> torch.Tensor:
        with self.autocast():
            outputs = self.lm(**model_inputs(x))
        self._last.outputs = outputs
        logits = outputs.logits[:, -(x["labels"].shape[1] + 1) : -1]
        return logits.float().reshape(-1, logits.shape[-1])


def _lm(model: nn.Module) -> nn.Module:
    return model.lm if isinstance(model, CausalLMClassifier) else model


class _StrategyPlugin:
    """One of our strategies (or a list of them) as an Avalanche ``SupervisedPlugin``, so it runs
    inside any Avalanche strategy. Each hook of :class:`continual_ft.train.protocol.Strategy` is called
    through the protocol's function for it (the order every loop keeps), at one of Avalanche's callbacks,
    and the state through methods of the plugin:

        train_data(stage, examples)         after_train_dataset_adaptation: replaces strategy.adapted_dataset
        before_stage(model, stage)          before_training_exp
        penalty(model, batch, out)          before_backward: strategy.loss += penalty
        after_backward(model, stage, step)  after_backward: Avalanche's SGD loop takes one optimizer step per
                                            mini-batch, so this is the step's gradient, before before_update
                                            (where :func:`run_experience` clips) and the optimizer step
        after_stage(model, stage)           after_training_exp (stage.examples: the experience's own data)
        state_dict, load_state_dict, stats  the plugin's own, one entry per strategy name, as our runner keeps them

    ``step`` counts the experience's optimizer steps from 1. Our strategies see the language model itself
    (``CausalLMClassifier.lm``) and the stage's examples, batched by ``encoder`` the way our runner batches
    them. ``stage.final`` is always False: the plugin cannot know whether another experience follows, so
    work only later stages use (EWC's Fisher, SSR's writing) runs after the last one too.
    ``last_penalty``: the latest step's penalty.

    Refused with one line (:func:`continual_ft.train.protocol.refuse`), before anything trains: an
    ``avalanche:*`` object (a loop of its own, not hooks), at construction; at ``before_training``, a
    template whose update is not Avalanche's SGD one (meta-learning's inner and outer updates have no
    backward callbacks) when a strategy has a ``penalty`` or ``after_backward``, and Avalanche's distributed
    training (a DDP-wrapped model, each process its share of the data: our hooks here sum nothing across
    processes).
    """

    def __init__(self, strategies, encoder: Encoder, batch_size: int = 8, autocast: Callable = nullcontext):
        super().__init__()  # SupervisedPlugin's
        self.strategies = list(strategies) if isinstance(strategies, (list, tuple)) else [strategies]
        instead = "give Avalanche its own strategy or plugin (avalanche.training) instead of StrategyPlugin"
        protocol.refuse(self.strategies, protocol.Loop("StrategyPlugin", instead))
        self.encoder, self.batch_size, self.autocast = encoder, batch_size, autocast
        self.task_ids: dict[str, int] = {}
        self.stage = None
        self.step = 0  # optimizer steps of the current experience
        self.last_penalty: torch.Tensor | None = None

    def _examples(self, dataset) -> list[Example]:
        items = [dataset[i] for i in range(len(dataset))]
        self.task_ids.update({it["example"].task: int(it["targets_task_labels"]) for it in items})
        return [it["example"] for it in items]

    def before_training(self, strategy, **kwargs):
        from avalanche.distributed import DistributedHelper
        from avalanche.training.templates.update_type import SGDUpdate

        if DistributedHelper.is_distributed:
            raise ContinualFTError("StrategyPlugin runs in one process, not in Avalanche's distributed training")
        if not isinstance(strategy, SGDUpdate):
            name = f"{type(strategy).__name__}'s loop (no backward callbacks)"
            loop = protocol.Loop(name, "use an Avalanche template with the SGD update", protocol.STAGE_HOOKS)
            protocol.refuse(self.strategies, loop)

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        examples = self._examples(strategy.experience.dataset)
        batches = protocol.Batches(self.encoder, self.batch_size, strategy.device, self.autocast)
        index = strategy.clock.train_exp_counter
        self.stage = protocol.stage_info(index, list(dict.fromkeys(e.task for e in examples)), examples, batches)

    def after_train_dataset_adaptation(self, strategy, **kwargs):
        examples = protocol.train_data(self.strategies, self.stage, self._examples(strategy.adapted_dataset))
        if examples != self.stage.examples:
            strategy.adapted_dataset = examples_dataset(examples, self.encoder, self.task_ids).train()

    def before_training_exp(self, strategy, **kwargs):
        self.step = 0
        protocol.before_stage(self.strategies, _lm(strategy.model), self.stage)

    def before_backward(self, strategy, **kwargs):
        model = strategy.model
        outputs = model.last_outputs if isinstance(model, CausalLMClassifier) else strategy.mb_output
        self.last_penalty = protocol.total_penalty(self.strategies, _lm(model), strategy.mb_x, outputs)
        if self.last_penalty is not None:
            strategy.loss += self.last_penalty

    def after_backward(self, strategy, **kwargs):
        self.step += 1
        protocol.after_backward(self.strategies, _lm(strategy.model), self.stage, self.step)

    def after_training_exp(self, strategy, **kwargs):
        protocol.after_stage(self.strategies, _lm(strategy.model), self.stage)

    def state_dict(self) -> dict:
        """Each strategy's ``state_dict`` under its name (what our runner saves for it)."""
        return {s.name: s.state_dict() for s in self.strategies}

    def load_state_dict(self, state: dict) -> None:
        for s in self.strategies:
            s.load_state_dict(state[s.name])

    def stats(self) -> dict[str, dict[str, float]]:
        """Each strategy's ``stats()`` under its name, for those that report any (A-GEM's projected share)."""
        return {s.name: s.stats() for s in self.strategies if s.stats()}


class _StageLoop:
    """What our runner asks of a stage, as an Avalanche plugin: the same AdamW schedule (warmup, then
    cosine/linear/constant) and gradient clipping as our trainer, ``max_steps``, a NaN stop, and the
    statistics of :class:`continual_ft.train.loop.StageStats` (steps, real tokens, task loss)."""

    def __init__(self, cfg, desc: str):
        super().__init__()
        self.cfg, self.desc = cfg, desc
        self.steps = self.tokens = self.answer_tokens = self.total_steps = 0
        self.loss_sum = 0.0

    def before_training_exp(self, strategy, **kwargs):
        from transformers import get_scheduler

        # The loader is made by now (replay's holds as many batches as the experience's own data).
        per_epoch = len(strategy.dataloader)
        self.total_steps = self.cfg.max_steps or self.cfg.epochs * per_epoch
        strategy.train_epochs = math.ceil(self.total_steps / max(per_epoch, 1))
        self.scheduler = get_scheduler(
            self.cfg.schedule,
            strategy.optimizer,
            num_warmup_steps=min(self.cfg.warmup_steps, self.total_steps),
            num_training_steps=self.total_steps,
        )

    def after_forward(self, strategy, **kwargs):
        with torch.no_grad():
            n = int((strategy.mb_y != -100).sum())
            loss = float(strategy._criterion(strategy.mb_output, strategy.mb_y)) * n
        if not math.isfinite(loss):
            from continual_ft.train.loop import NonFiniteLoss

            raise NonFiniteLoss(f"{self.desc}, step {self.steps + 1}: the loss is {loss / max(n, 1)}")
        self.loss_sum, self.answer_tokens = self.loss_sum + loss, self.answer_tokens + n
        self.tokens += int(strategy.mb_x["n_tokens"])

    def before_update(self, strategy, **kwargs):
        if self.cfg.max_grad_norm:
            params = [p for p in strategy.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)

    def after_update(self, strategy, **kwargs):
        self.scheduler.step()
        self.steps += 1
        if self.steps >= self.total_steps:
            strategy.stop_training()


def run_experience(template, experience, cfg, *, desc: str = "train"):
    """Train ``template`` (an Avalanche strategy) on one experience with a fresh AdamW over the trainable
    parameters and our schedule; returns :class:`continual_ft.train.loop.StageStats`."""
    from continual_ft.train.loop import StageStats

    params = [p for p in template.model.parameters() if p.requires_grad]
    template.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    template.optimized_param_id = None  # Avalanche maps the new optimizer's parameters afresh
    loop = _plugin(_StageLoop)(cfg, desc)
    template.plugins.insert(0, loop)
    try:
        start = time.perf_counter()
        template.train(experience, eval_streams=[])
        seconds = time.perf_counter() - start
    finally:
        template.plugins.remove(loop)
    stats = StageStats(steps=loop.steps, tokens=loop.tokens, seconds=seconds)
    stats.train_loss = loop.loss_sum / max(loop.answer_tokens, 1)
    return stats


def _plugin(impl: type) -> type:
    """``impl`` with Avalanche's ``SupervisedPlugin`` as its base (made on first use: Avalanche is optional)."""
    if impl not in _PLUGINS:
        require_avalanche(impl.__name__.lstrip("_"))
        from avalanche.core import SupervisedPlugin

        _PLUGINS[impl] = type(impl.__name__.lstrip("_"), (impl, SupervisedPlugin), {"__module__": __name__})
    return _PLUGINS[impl]


_PLUGINS: dict[type, type] = {}


def __getattr__(name: str):
    # `from continual_ft.integrations.avalanche import StrategyPlugin` builds the class then.
    if name == "StrategyPlugin":
        return _plugin(_StrategyPlugin)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
