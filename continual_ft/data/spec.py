"""What one ``tasks:`` entry of a scenario asks for: ``TaskSpec``, checked on construction.

It sits below both the loaders (``_sources``), which read a spec, and ``data``, which registers
them in ``SOURCES`` and builds tasks, so neither of those has to import the other back.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from continual_ft.errors import ContinualFTError

__all__ = [
    "TaskSpec",
    "TASK_KEYS",
    "SPLITS",
    "DEFAULT_SIZES",
    "OPTIONS",
    "BUILT_IN",
    "FILE_SOURCES",
    "TASK_TYPES",
    "METRIC_TYPES",
    "DEFAULT_METRICS",
    "check_sizes",
]

SPLITS = ("train", "validation", "test")
#: A split's size when the task does not give one: at most this many, fewer if the data holds fewer.
DEFAULT_SIZES = {"train": 500, "validation": 64, "test": 150}

#: The ``options:`` each source accepts, with their defaults; its keys are the source names
#: (``data.SOURCES`` registers a loader under each).
OPTIONS = {
    "licenses": {"max_chars": 400, "min_chars": 80, "max_per_group": 3},
    "license_rules": {"max_chars": 400, "min_chars": 40, "max_per_group": 2},
    "icd10": {"max_per_group": 4},
    "edam": {"max_per_group": 6},
    "jsonl": {},
    "csv": {},
    "parquet": {},
    "hf": {},
}
BUILT_IN = ("licenses", "license_rules", "icd10", "edam")
FILE_SOURCES = ("jsonl", "csv", "parquet")

#: ``type: choice``: the answer is one of the task's labels, scored by log-likelihood over them (the default
#: when ``labels:`` is given). ``type: generate``: the model writes its answer, scored against the gold text.
TASK_TYPES = ("choice", "generate")
#: Every metric a task may name under ``metrics:``, and the task types it fits
#: (:mod:`continual_ft.eval.text_metrics` implements the generative ones, from rouge-score, sacrebleu and rapidfuzz).
METRIC_TYPES = {
    "accuracy": ("choice",),
    "macro_f1": ("choice",),
    "exact_match": ("choice", "generate"),
    "token_f1": ("generate",),
    "rouge_l": ("generate",),
    "rouge_1": ("generate",),
    "rouge_2": ("generate",),
    "chrf": ("generate",),
    "bleu": ("generate",),
    "edit_similarity": ("generate",),
}
#: A task's metrics when it names none; the first is its primary metric unless ``metric:`` says otherwise.
DEFAULT_METRICS = {
    "choice": ["accuracy", "exact_match", "macro_f1"],
    "generate": ["rouge_l", "exact_match", "token_f1", "chrf"],
}


def _help(text: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class TaskSpec:
    """What one ``tasks:`` entry of a scenario asks for; checked on construction."""

    name: str = _help("task name (the key under `tasks:`)")
    source: str = _help(f"where the records come from: {', '.join(OPTIONS)}")
    prompt: str = _help(
        "prompt template; {field} is a record field, {text} the text field, {labels} the label list",
        "{text}\n\nAnswer:",
    )
    text_field: str = _help("record field that {text} stands for", "text")
    label_field: str = _help("record field holding the gold label", "label")
    group_field: str | None = _help("record field whose value is the split group (default: each row its own group)")
    labels: list[str] | None = _help("candidate answers in order; built-in sources keep only these (default: all)")
    sizes: dict = _help(
        "examples per split: {train, validation, test}; more than a split holds is an error, "
        "a split not given takes up to the default (500, 64, 150)",
        factory=dict,
    )
    options: dict = _help(
        "source options (licenses, license_rules: max_chars, min_chars, max_per_group; icd10, edam: max_per_group)",
        factory=dict,
    )
    balance: bool = _help("sample each split round-robin across labels, so labels are as even as the data allows", True)
    path: str | None = _help("data file (jsonl/csv/parquet) or save_to_disk folder (hf), relative to the YAML")
    files: dict | None = _help("pre-split data files: {train: ..., validation: ..., test: ...}")
    dataset: str | None = _help("hf: dataset name or path given to datasets.load_dataset")
    config: str | None = _help("hf: dataset configuration name")
    split: str = _help("hf: the dataset split to read and split by group", "train")
    splits: dict | None = _help("hf: use the dataset's own splits: {train: <split>, validation: ..., test: ...}")
    type: str | None = _help(
        f"{' or '.join(TASK_TYPES)}: pick one of `labels:` (the default) or write the answer (no `labels:`)"
    )
    metrics: list[str] | None = _help(
        f"metrics to score with, each in an R matrix of its own: {', '.join(METRIC_TYPES)} "
        "(default: accuracy, exact_match, macro_f1 for choice; rouge_l, exact_match, token_f1, chrf for generate)"
    )
    metric: str | None = _help("the primary metric (ACC, BWT, ... are computed on it); default the first of `metrics:`")
    max_new_tokens: int | None = _help(
        "generate: tokens the model may write (default: the longest training answer plus a margin, capped)"
    )
    stop: list[str] | None = _help("generate: strings that end an answer (besides end of sequence)")
    base_dir: str = field(default=".", metadata={"help": "folder that relative paths are resolved against"})
    locate: Callable[[str], str] | None = field(default=None, repr=False, metadata={"help": "field -> location text"})

    def __post_init__(self):
        if not isinstance(self.source, str) or self.source not in OPTIONS:
            raise self.fail("source", f"unknown source {self.source!r}; choose from: {', '.join(OPTIONS)}")
        for name in ("prompt", "text_field", "label_field", "split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise self.fail(name, "must be a non-empty string")
        self.placeholders()  # raises on a malformed template
        if self.labels is not None:
            if (
                not isinstance(self.labels, list)
                or not self.labels
                or any(isinstance(x, (dict, list)) for x in self.labels)
            ):
                raise self.fail("labels", "must be a non-empty list of label strings")
            self.labels = [str(x) for x in self.labels]
            if len(set(self.labels)) != len(self.labels):
                raise self.fail("labels", "lists a label twice")
        # Only the sizes asked for: the defaults fill in at sampling, where they may take fewer.
        self.sizes = check_sizes(self.sizes, lambda key: self.where(f"sizes.{key}" if key else "sizes"))
        if not isinstance(self.options, dict):
            raise self.fail("options", "must be a mapping")
        for key, value in self.options.items():
            if key not in OPTIONS[self.source]:
                known = ", ".join(OPTIONS[self.source]) or "none"
                raise self.fail(f"options.{key}", f"unknown option for source {self.source}; valid: {known}")
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise self.fail(f"options.{key}", f"must be a positive integer, got {value!r}")
        if not isinstance(self.balance, bool):
            raise self.fail("balance", f"must be true or false, got {self.balance!r}")
        self._check_type()
        self._check_location()

    @property
    def kind(self) -> str:
        """The task type, ``choice`` where ``type:`` is not given."""
        return self.type or "choice"

    def _check_type(self):
        if self.type is not None and self.type not in TASK_TYPES:
            raise self.fail("type", f"unknown task type {self.type!r}; choose from: {', '.join(TASK_TYPES)}")
        if self.kind == "generate" and self.labels is not None:
            raise self.fail("labels", "a task of type: generate writes its answer; give no labels: (or type: choice)")
        if self.metrics is not None:
            if (
                not isinstance(self.metrics, list)
                or not self.metrics
                or not all(isinstance(m, str) for m in self.metrics)
            ):
                raise self.fail("metrics", "must be a non-empty list of metric names")
            for m in self.metrics:
                if m not in METRIC_TYPES:
                    raise self.fail("metrics", f"unknown metric {m!r}; choose from: {', '.join(METRIC_TYPES)}")
                if self.kind not in METRIC_TYPES[m]:
                    fits = ", ".join(k for k, v in METRIC_TYPES.items() if self.kind in v)
                    raise self.fail("metrics", f"{m} does not fit a task of type {self.kind}; choose from: {fits}")
            self.metrics = list(dict.fromkeys(self.metrics))
        if self.metric is not None and self.metric not in self.metric_names():
            raise self.fail(
                "metric", f"{self.metric!r} is not one of this task's metrics: {', '.join(self.metric_names())}"
            )
        for name in ("max_new_tokens",):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise self.fail(name, f"must be a positive integer, got {value!r}")
        if self.kind == "choice" and (self.max_new_tokens is not None or self.stop is not None):
            raise self.fail(
                "max_new_tokens" if self.max_new_tokens is not None else "stop", "applies to type: generate"
            )
        if self.stop is not None and (
            not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop)
        ):
            raise self.fail("stop", "must be a list of non-empty strings")

    def metric_names(self) -> list[str]:
        """This task's metrics, in order: ``metrics:`` or its type's default."""
        return list(self.metrics) if self.metrics else list(DEFAULT_METRICS[self.kind])

    def primary_metric(self) -> str:
        return self.metric or self.metric_names()[0]

    def _check_location(self):
        given = [
            k for k in ("path", "files", "dataset", "splits", "config", "group_field") if getattr(self, k) is not None
        ]
        if self.source in BUILT_IN:
            # A generative task may take its answer from another field of the built-in records (EDAM's ``name``).
            changed = (
                (("text_field", "text"),)
                if self.kind == "generate"
                else (("text_field", "text"), ("label_field", "label"))
            )
            extra = given + [k for k, d in changed if getattr(self, k) != d]
            if extra:
                raise self.fail(extra[0], f"does not apply to the built-in source {self.source}")
        elif self.source in FILE_SOURCES:
            if (self.path is None) == (self.files is None):
                raise self.fail("path", f"source {self.source} needs exactly one of `path:` or `files:`")
            for bad in ("dataset", "splits", "config"):
                if getattr(self, bad) is not None:
                    raise self.fail(bad, f"applies only to source hf, not {self.source}")
        elif (self.path is None) == (self.dataset is None) or self.files is not None:
            raise self.fail("dataset", "source hf needs exactly one of `dataset:` or `path:` (and no `files:`)")
        for name in ("files", "splits"):
            mapping = getattr(self, name)
            if mapping is None:
                continue
            if not isinstance(mapping, dict) or any(
                k not in SPLITS or not isinstance(v, str) for k, v in mapping.items()
            ):
                raise self.fail(name, f"must map some of {', '.join(SPLITS)} to a name")
            if "train" not in mapping or "test" not in mapping:
                raise self.fail(name, "needs at least `train:` and `test:`")
        for name in ("path", "dataset", "config", "group_field"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise self.fail(name, "must be a string")

    def where(self, key: str) -> str:
        """Location text for a field of this task, e.g. ``my.yaml line 12 (tasks.qa.prompt)``."""
        return self.locate(key) if self.locate else f"task {self.name!r} field '{key}'"

    def fail(self, key: str, message: str) -> ContinualFTError:
        """The error to raise for a bad value of ``key`` (the caller raises it)."""
        return ContinualFTError(f"{self.where(key)}: {message}" if message else self.where(key))

    def placeholders(self) -> list[str]:
        """Field names used as ``{name}`` in the prompt."""
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.prompt) if f is not None]
        except ValueError as e:
            raise self.fail("prompt", f"malformed template ({e}); write literal braces as {{{{ and }}}}") from None
        for name in names:
            if not name.isidentifier():
                raise self.fail("prompt", f"placeholder {{{name}}} must be a plain field name")
        return list(dict.fromkeys(names))

    def required_fields(self) -> list[str]:
        """Record fields every row must have: the label, the group field and, if the prompt uses {text}, the text."""
        needed = [self.label_field] + ([self.group_field] if self.group_field else [])
        needed += [self.text_field] if "text" in self.placeholders() else []
        return list(dict.fromkeys(needed))

    def option_values(self) -> dict:
        """The source's options with defaults filled in."""
        return {**OPTIONS[self.source], **self.options}

    def resolve(self, name: str, key: str, must_exist: bool = True) -> Path:
        """A data path relative to ``base_dir`` (or absolute); a missing file names the YAML field."""
        path = Path(name).expanduser()
        path = path if path.is_absolute() else Path(self.base_dir) / path
        if must_exist and not path.exists():
            raise self.fail(key, f"file not found: {path}")
        return path


TASK_KEYS = {f.name: f.metadata["help"] for f in fields(TaskSpec) if f.name not in ("name", "base_dir", "locate")}


def check_sizes(sizes, fail: Callable[[str], str]) -> dict:
    """``sizes`` as {split: positive int}; ``fail(key)`` is the location text of a bad key ('' for the whole)."""
    if not isinstance(sizes, dict):
        raise ContinualFTError(f"{fail('')}: must be a mapping like {{train: 500, validation: 64, test: 150}}")
    for key, value in sizes.items():
        if key not in SPLITS:
            raise ContinualFTError(f"{fail(key)}: unknown split; valid: {', '.join(SPLITS)}")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ContinualFTError(f"{fail(key)}: must be a positive integer, got {value!r}")
    return dict(sizes)
