"""What ``tune`` searches and what it maximises: ``search.<key>=<spec>`` dimensions and ``objective=``.

Search specs (the value after ``search.<key>=``):

* ``a:b`` — uniform between a and b; integers when the setting is an integer (``lora.r=4:16``),
  floats when it is a float (``replay.ratio=0.1:0.6``); for a setting without a number default
  (``data.train_size``), integers when both bounds are integers.
* ``a:b:step`` — the same on a grid of ``step`` (``replay.buffer_size=100:400:100``).
* ``log:a:b`` — log-uniform, for scales (``train.lr=log:1e-4:3e-3``); needs 0 < a < b.
* ``a,b,c`` or ``choice:a,b,c`` — one of the values, as text (commas inside ``[...]`` stay:
  ``lora.target_modules=[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]``).

The objective is a weighted sum of the primary metric's scalars, always maximised, in percent:
``acc``, ``bwt``, ``acc+0.5*bwt``, ``acc-forgetting``. Its *running* value after stage k (what
the pruner sees) is the same formula on the scenario cut after stage k: R's rows 0..k, and only the
tasks first trained by then; a metric still undefined there (BWT after stage 1) counts 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from continual_ft.errors import ContinualFTError
from continual_ft.eval import metrics

__all__ = ["Dimension", "Objective", "parse_dimension", "parse_objective", "metric_names"]


@dataclass(frozen=True)
class Dimension:
    """One searched setting: ``kind`` is ``int``, ``float`` or ``choice``."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[str, ...] = ()

    def suggest(self, trial) -> str:
        """Ask an Optuna trial for a value (the parameter is named after the key); returns it as override text."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return str(trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log))
        return repr(trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log))

    def extremes(self) -> list[str]:
        """The values a config check must accept before any trial runs: every choice, or both bounds."""
        return list(self.choices) if self.kind == "choice" else [repr(self.low), repr(self.high)]


_INT = re.compile(r"[+-]?\d+")


def _number(text: str, where: str) -> float | int:
    try:
        value = int(text) if _INT.fullmatch(text) else float(text)
    except ValueError:
        raise ContinualFTError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ContinualFTError(f"{where}: bounds must be finite, got {text}")
    return value


def parse_dimension(key: str, spec: str, current=None) -> Dimension:
    """``search.<key>=<spec>`` as a :class:`Dimension`; ``current`` (the setting's default) picks int or float."""
    from continual_ft.study.compare import split_values

    where = f"search.{key}={spec}"
    log = spec.startswith("log:")
    body = spec[4:] if log else spec
    values = split_values(spec[7:] if spec.startswith("choice:") else spec)
    if spec.startswith("choice:") or (len(values) > 1 and not log):
        if any(not v.strip() for v in values):
            raise ContinualFTError(f"{where}: empty choice; give values as a,b,c")
        if len(values) < 2:
            raise ContinualFTError(f"{where}: one value is no search; set it as {key}={values[0]}")
        if len(set(values)) < len(values):
            raise ContinualFTError(f"{where}: a value is given twice")
        return Dimension(key, "choice", choices=tuple(values))
    parts = body.split(":")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise ContinualFTError(
            f"{where}: not a search spec; use a:b, a:b:step, log:a:b or a,b,c (a fixed value is {key}=value)"
        )
    if log and len(parts) == 3:
        raise ContinualFTError(f"{where}: a log range takes no step")
    low, high, *step = (_number(p.strip(), where) for p in parts)
    if isinstance(current, (bool, str, list, dict)):
        raise ContinualFTError(f"{where}: {key} is not a number; search it over values a,b,c")
    if isinstance(current, int):
        if not all(isinstance(v, int) for v in (low, high, *step)):
            raise ContinualFTError(f"{where}: {key} is an integer setting; bounds and step must be integers")
        kind = "int"
    elif isinstance(current, float):
        kind = "float"
    else:
        kind = "int" if all(isinstance(v, int) for v in (low, high, *step)) else "float"
    if low >= high:
        raise ContinualFTError(f"{where}: empty range; the lower bound must be below the upper")
    if log and low <= 0:
        raise ContinualFTError(f"{where}: a log range must lie above 0, got lower bound {low}")
    if step and not 0 < step[0] <= high - low:
        raise ContinualFTError(f"{where}: step must be > 0 and no wider than the range")
    if kind == "float":
        low, high, step = float(low), float(high), [float(s) for s in step]
    return Dimension(key, kind, low, high, log, step[0] if step else None)


def metric_names() -> tuple[str, ...]:
    """The scalars :func:`continual_ft.eval.metrics.summary` computes, which an objective may weigh."""
    return tuple(metrics.summary([[0.0, 0.0]] * 3, [1, 2]))


_TERM = re.compile(r"\s*([+-])?\s*(?:(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)\s*\*\s*)?([a-z_]+)\s*")


@dataclass(frozen=True)
class Objective:
    """``Σ_m w_m · metric_m`` over the primary metric's scalars (fractions), × 100: maximised by ``tune``."""

    weights: tuple[tuple[str, float], ...]

    def __str__(self) -> str:
        text = ""
        for name, w in self.weights:
            sign = "-" if w < 0 else ("+" if text else "")
            text += sign + (name if abs(w) == 1 else f"{abs(w):g}*{name}")
        return text

    def value(self, summary: dict) -> float | None:
        """The objective from a ``metrics.summary`` dict; None if a weighed metric is undefined."""
        if any(summary.get(name) is None for name, _ in self.weights):
            return None
        return 100 * sum(w * summary[name] for name, w in self.weights)

    def running(self, results: dict, stages_done: int) -> float:
        """The objective on the scenario cut after ``stages_done`` stages (see the module docstring)."""
        R = results["R"][results["primary_metric"]][: stages_done + 1]
        seen = [j for j, f in enumerate(results["first_stage"]) if f <= stages_done]
        summary = metrics.summary([[row[j] for j in seen] for row in R], [results["first_stage"][j] for j in seen])
        return 100 * sum(w * (summary[name] or 0.0) for name, w in self.weights)


def parse_objective(text: str) -> Objective:
    """``"acc+0.5*bwt"`` → ``Objective((("acc", 1.0), ("bwt", 0.5)))``; weights of a repeated metric add up."""
    names = metric_names()
    weights: dict[str, float] = {}
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos or (pos and not m.group(1)):
            raise ContinualFTError(
                f"objective={text}: expected a weighted sum of {', '.join(names)}, like acc+0.5*bwt or acc-forgetting"
            )
        sign, coef, name = m.groups()
        if name not in names:
            raise ContinualFTError(f"objective={text}: unknown metric {name!r}; choose from {', '.join(names)}")
        weights[name] = weights.get(name, 0.0) + (-1.0 if sign == "-" else 1.0) * float(coef or 1.0)
        pos = m.end()
    weights = {k: w for k, w in weights.items() if w != 0}
    if not weights:
        raise ContinualFTError(f"objective={text!r}: weighs no metric; e.g. objective=acc")
    return Objective(tuple(weights.items()))
