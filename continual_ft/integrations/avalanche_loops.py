"""Avalanche's own strategies (https://avalanche.continualai.org) as training loops of their own
(:class:`continual_ft.train.protocol.StageLoop`), run on our model, LoRA adapter and data inside our
runner: ``python cli.py run strategy=avalanche:ewc``.

They are loops, not strategies: Avalanche's plugins act inside Avalanche's loop, and none of our hooks
does. ``AVALANCHE_LOOPS`` registers them; ``continual_ft.strategies.build`` takes their names beside our
strategies'. The runner sets up each stage's adapter, then hands the stage to
:meth:`AvalancheLoop.train_stage` instead of our trainer (:func:`continual_ft.train.protocol.training_loop`);
it evaluates with our evaluator and writes the same run directory, so ``compare`` puts ``avalanche:ewc``
beside our ``ewc``. Avalanche is imported only when such a run starts (:mod:`continual_ft.integrations.avalanche`
says how a causal LM meets its classifier API).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field

from continual_ft.errors import ContinualFTError
from continual_ft.integrations.avalanche import CausalLMClassifier, experience, require_avalanche, run_experience
from continual_ft.train.protocol import StageLoop

__all__ = ["AVALANCHE_LOOPS", "AvalancheLoop"]


@dataclass
class AvalancheNaiveConfig:
    """Avalanche's ``Naive`` has no settings."""


@dataclass
class AvalancheReplayConfig:
    mem_size: int = field(default=200, metadata={"help": "examples in Avalanche's experience-balanced buffer"})

    def __post_init__(self):
        if self.mem_size < 1:
            raise ContinualFTError(f"avalanche:replay.mem_size must be >= 1, got {self.mem_size}")


@dataclass
class AvalancheEWCConfig:
    ewc_lambda: float = field(default=100.0, metadata={"help": "penalty weight: loss += λ Σ F (θ − θ*)², F unscaled"})
    mode: str = field(default="separate", metadata={"help": "separate (one penalty per experience) or online"})
    decay_factor: float | None = field(default=None, metadata={"help": "online mode: decay of the old importances"})

    def __post_init__(self):
        if self.mode not in ("separate", "online"):
            raise ContinualFTError(f"avalanche:ewc.mode must be separate or online, got {self.mode!r}")
        if (self.mode == "online") != (self.decay_factor is not None):
            raise ContinualFTError("avalanche:ewc.decay_factor is set exactly when avalanche:ewc.mode=online")


@dataclass
class AvalancheLwFConfig:
    alpha: float = field(default=1.0, metadata={"help": "distillation weight"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature"})


@dataclass
class AvalancheSIConfig:
    si_lambda: float = field(default=1.0, metadata={"help": "Synaptic Intelligence penalty weight"})
    eps: float = field(default=1e-7, metadata={"help": "damping of the importance denominator"})


@dataclass
class AvalancheMASConfig:
    lambda_reg: float = field(default=1.0, metadata={"help": "Memory Aware Synapses penalty weight"})
    alpha: float = field(default=0.5, metadata={"help": "running-average weight of the importances"})


@dataclass
class AvalancheAGEMConfig:
    patterns_per_exp: int = field(default=100, metadata={"help": "examples kept per experience"})
    sample_size: int = field(default=16, metadata={"help": "memory examples per reference gradient"})


@dataclass
class AvalancheCumulativeConfig:
    """Avalanche's ``Cumulative`` (trains on every experience so far) has no settings."""


class AvalancheLoop(StageLoop):
    """Base of the ``avalanche:*`` entries: ``avalanche_class`` from ``avalanche.training``, its settings
    the config's fields. It trains alone (no ``+``): its plugins, not our hooks, act inside its loop."""

    name = "avalanche"
    avalanche_class = ""

    def __init__(self, config=None):
        self.config = config or LOOP_CONFIGS[self.name]()
        self.template = None  # the Avalanche strategy, made at the first stage; its plugins hold the state
        self.task_ids: dict[str, int] = {}
        self.stages = 0

    def check_run(self, config) -> None:
        """What the Avalanche loop cannot do, refused before a run directory is made."""
        require_avalanche(f"strategy={self.name}")
        super().check_run(config)  # alone: Avalanche's plugins, not our hooks, act inside its loop
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun/accelerate
            raise ContinualFTError(f"strategy={self.name} runs in one process: launch it without torchrun/accelerate")
        t = config.train
        unsupported = {
            "train.grad_accum": t.grad_accum != 1,
            "train.max_tokens": t.max_tokens != 0,
            "train.packing": t.packing,
            "train.eval_every": t.eval_every != 0,
            "train.patience": t.patience != 0,
            "train.checkpoint_every": t.checkpoint_every != 0,
            "train.checkpoint_minutes": t.checkpoint_minutes != 0,
        }
        bad = [k for k, on in unsupported.items() if on]
        if bad:
            raise ContinualFTError(f"strategy={self.name} trains in Avalanche's loop, which has no {bad[0]}")

    def make_template(self, model, device, cfg, plugins=()):
        """The Avalanche strategy over ``model`` (a ``CausalLMClassifier``), logging nothing."""
        import avalanche.training
        import torch
        from avalanche.training.plugins import EvaluationPlugin

        cls = getattr(avalanche.training, self.avalanche_class)
        with warnings.catch_warnings():  # "No loggers specified": on purpose
            warnings.simplefilter("ignore")
            return cls(
                model=model,
                optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr),
                criterion=torch.nn.CrossEntropyLoss(),  # ignore_index=-100: the mean answer-token loss
                train_mb_size=cfg.batch_size,
                train_epochs=cfg.epochs,
                eval_mb_size=cfg.batch_size,
                device=device,
                plugins=list(plugins),
                evaluator=EvaluationPlugin(loggers=[]),  # our runner evaluates and records
                **asdict(self.config),
            )

    def train_stage(self, model, encoder, examples, validation, cfg, strategies=(), stage=None, **kw):
        """One stage with Avalanche's loop; the runner's signature of ``continual_ft.train.loop.train_stage``."""
        import torch

        from continual_ft.train.loop import validation_loss

        dist = kw.get("dist")
        if dist is not None and dist.world > 1:
            raise ContinualFTError(f"strategy={self.name} runs in one process")
        autocast = kw.get("autocast")
        wrapped = CausalLMClassifier(model, autocast) if autocast else CausalLMClassifier(model)
        device = next(model.parameters()).device
        if self.template is None:
            self.template = self.make_template(wrapped, device, cfg)
        self.template.model = wrapped  # the runner may have given the model a new adapter
        for t in dict.fromkeys(e.task for e in examples):
            self.task_ids.setdefault(t, len(self.task_ids))
        torch.manual_seed(kw.get("seed", 0))  # Avalanche's loaders shuffle with torch's generator
        exp = experience(examples, encoder, self.task_ids, self.stages)
        stats = run_experience(self.template, exp, cfg, desc=kw.get("desc", "train"))
        self.stages += 1
        if validation:
            stats.val_losses = [validation_loss(model, encoder, validation, cfg.batch_size, wrapped.autocast)]
            stats.best_val_loss = stats.val_losses[0]
        return stats

    def state_dict(self) -> dict:
        # Avalanche's plugins keep their state (buffers, importances, the teacher) in memory only.
        return {"stages": self.stages}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stages"):
            raise ContinualFTError(
                f"strategy={self.name} cannot resume after stage {state['stages']}: Avalanche's plugins keep "
                "their state in memory only; start the run again"
            )


# Avalanche's regularizers keep importances and anchors of the parameters that trained (by name); under
# new/stack, merge and merge_final each stage trains a fresh adapter they never saw, so they would add nothing.
_ONE_ADAPTER = (
    ("continue",),
    "under adapter={adapter} each stage trains a fresh adapter with no importances of its own",
)
# Avalanche's LwF copies the model at the end of a stage and A-GEM takes its gradients from the model that trains:
# under merge_final that is the stage's lone adapter on the base, not the evaluated combination of the stages.
_NOT_MERGE_FINAL = (
    ("continue", "new", "stack", "merge"),
    "under adapter={adapter} the model that trains is the base with the stage's fresh adapter alone, not the "
    "evaluated combination of the earlier stages",
)
_ANY = (None, "")


def _entry(name: str, avalanche_class: str, config_cls: type, doc: str, modes: tuple) -> type:
    adapter_modes, refusal = modes
    return type(
        f"Avalanche{avalanche_class}",
        (AvalancheLoop,),
        {
            "name": name,
            "avalanche_class": avalanche_class,
            "__doc__": doc,
            "summary": doc,
            "__module__": __name__,
            "adapter_modes": adapter_modes,
            "adapter_refusal": refusal,
        },
    )


_ENTRIES = [
    (
        "avalanche:naive",
        "Naive",
        AvalancheNaiveConfig,
        "Avalanche's Naive: plain fine-tuning in Avalanche's loop.",
        _ANY,
    ),
    (
        "avalanche:replay",
        "Replay",
        AvalancheReplayConfig,
        "Avalanche's Replay: experience-balanced buffer batches.",
        _ANY,
    ),
    (
        "avalanche:ewc",
        "EWC",
        AvalancheEWCConfig,
        "Avalanche's EWC: importances of every parameter, whole-data pass.",
        _ONE_ADAPTER,
    ),
    (
        "avalanche:lwf",
        "LwF",
        AvalancheLwFConfig,
        "Avalanche's LwF: distils a full copy of the previous model.",
        _NOT_MERGE_FINAL,
    ),
    ("avalanche:si", "SynapticIntelligence", AvalancheSIConfig, "Avalanche's Synaptic Intelligence.", _ONE_ADAPTER),
    ("avalanche:mas", "MAS", AvalancheMASConfig, "Avalanche's Memory Aware Synapses.", _ONE_ADAPTER),
    (
        "avalanche:agem",
        "AGEM",
        AvalancheAGEMConfig,
        "Avalanche's A-GEM: gradient projection on a memory sample.",
        _NOT_MERGE_FINAL,
    ),
    ("avalanche:cumulative", "Cumulative", AvalancheCumulativeConfig, "Avalanche's Cumulative: all data so far.", _ANY),
]

LOOP_CONFIGS: dict[str, type] = {name: config for name, _, config, _, _ in _ENTRIES}

#: The registry of Avalanche's loops, ``name -> (loop class, config dataclass)``: ``strategy=`` takes these
#: names beside those of ``continual_ft.strategies.STRATEGIES``.
AVALANCHE_LOOPS: dict[str, tuple[type[AvalancheLoop], type]] = {
    name: (_entry(name, cls_name, config, doc, modes), config) for name, cls_name, config, doc, modes in _ENTRIES
}
