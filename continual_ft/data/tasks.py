"""Tasks as lists of prompt/answer examples, built from a data source and split by group.

A task comes from a ``TaskSpec`` (one entry under ``tasks:`` in a scenario YAML). Its source
yields raw records; each record's ``group`` goes wholly into one split, chosen by a stable hash:

    u = sha256(f"{seed}:{group}") / 2**256;  train if u < 0.7, validation if u < 0.8, else test

so no license (or near-duplicate rule text, ICD category, EDAM parent concept, or user group)
seen in training shows up in test. Each split is then sampled to its size with a seeded RNG,
round-robin across labels when ``balance`` is on.
A size the task asks for (``sizes:``, a scenario's ``quick:``, ``data.train_size=``) that the
split cannot fill is an error; a default size takes what there is.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from continual_ft.data import sources as _sources
from continual_ft.data.sources import DEFAULT_LABELS, icd10_chapter
from continual_ft.data.spec import BUILT_IN, DEFAULT_SIZES, SPLITS, TASK_KEYS, TaskSpec, check_sizes
from continual_ft.errors import ContinualFTError

__all__ = [
    "MOSTLY_DISTINCT",
    "Example",
    "Task",
    "TaskSpec",
    "SOURCES",
    "SPLITS",
    "FRACTIONS",
    "DEFAULT_SIZES",
    "TASK_KEYS",
    "build_task",
    "check_sizes",
    "split_of",
    "icd10_chapter",
    "normalize_answer",
]

#: A task without ``labels:`` or ``type:`` whose distinct answers exceed this share of its examples (and 20) is
#: free text, not a choice: it stops with one line rather than becoming a hundred-way choice.
MOSTLY_DISTINCT = 0.5

#: Share of groups per split (the rest of the unit interval goes to test).
FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}

#: Source name -> ``loader(spec, seed) -> list[dict]``; each record carries a ``group`` key.
#: The names are those of ``_spec.OPTIONS``, where a ``TaskSpec`` checks its source.
SOURCES: dict[str, Callable] = {
    "licenses": _sources.load_licenses,
    "license_rules": _sources.load_license_rules,
    "icd10": _sources.load_icd10,
    "edam": _sources.load_edam,
    "jsonl": _sources.load_jsonl,
    "csv": _sources.load_csv,
    "parquet": _sources.load_parquet,
    "hf": _sources.load_hf,
}


@dataclass(frozen=True)
class Example:
    """One prompt and its gold answer."""

    task: str
    prompt: str
    answer: str
    group: str = ""


def normalize_answer(text: str) -> str:
    """An answer as evaluation compares it: its first line, stripped, without a final period, lower case."""
    return text.strip().split("\n")[0].strip().rstrip(".").strip().lower()


@dataclass
class Task:
    """A named task: its three splits, and how it is answered and scored.

    A ``choice`` task has candidate labels in a fixed order; a ``generate`` task has none (``labels == []``):
    the model writes its answer, at most ``max_new_tokens`` tokens, ended early by one of ``stop``.
    """

    name: str
    labels: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    kind: str = "choice"
    metrics: tuple[str, ...] = ("accuracy", "exact_match", "macro_f1")
    metric: str = "accuracy"  # the primary metric
    max_new_tokens: int | None = None  # generate: None until the encoder sizes it from the training answers
    stop: tuple[str, ...] = ()

    @property
    def generative(self) -> bool:
        return self.kind == "generate"


def split_of(group: str, seed: int = 0) -> str:
    """The split a group belongs to: a stable hash of seed and group, cut at ``FRACTIONS``."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest(), "big") / 2**256
    if u < FRACTIONS["train"]:
        return "train"
    return "validation" if u < FRACTIONS["train"] + FRACTIONS["validation"] else "test"


def _sample(examples: list[Example], n: int, labels: list[str], rng: random.Random, balance: bool) -> list[Example]:
    if not balance:
        return rng.sample(examples, min(n, len(examples)))
    queues = [[e for e in examples if e.answer == label] for label in labels]
    for q in queues:
        rng.shuffle(q)
    picked: list[Example] = []
    while len(picked) < min(n, len(examples)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    rng.shuffle(picked)
    return picked


def _check_sizes_fit(spec: TaskSpec, pools: dict[str, list[Example]], pre_split: bool) -> None:
    """A size the task asks for must fit its split: silently training on less would misreport the run."""
    counts = "/".join(str(len(pools[s])) for s in SPLITS)
    for split, asked in spec.sizes.items():
        if asked > len(pools[split]):
            if pre_split:
                how = f"pre-split: {counts} in {'/'.join(SPLITS)}"
            else:
                shares = "/".join(f"{round(100 * FRACTIONS[s])}" for s in SPLITS)
                how = f"of {sum(map(len, pools.values()))} in all, split {shares} by group into {'/'.join(SPLITS)}"
            raise ContinualFTError(
                f"task {spec.name!r}: sizes.{split}={asked} but the data holds only {len(pools[split])} "
                f"{split} examples ({how})"
            )


def _check_fields(spec: TaskSpec, records: list[dict]) -> None:
    """Every placeholder of the prompt is a field of the data, and every row has the fields the task reads."""
    fields_ = [k for k in records[0] if not k.startswith("_")]
    known = list(dict.fromkeys(fields_ + ["labels"] + (["text"] if spec.text_field in records[0] else [])))
    for name in spec.placeholders():
        if name not in known:
            raise spec.fail("prompt", f"placeholder {{{name}}} is not a field of the data (fields: {', '.join(known)})")
    required = spec.required_fields() + [p for p in spec.placeholders() if p not in ("text", "labels", "group")]
    for r in records:
        for name in required:
            if r.get(name) is None:
                raise ContinualFTError(f"{r['_where']}: missing field '{name}'")


def _labels(spec: TaskSpec, records: list[dict]) -> tuple[list[str], list[dict]]:
    """The task's labels (none for a generative task) and the records that carry one of them."""
    if spec.kind == "generate":
        for r in records:
            if not str(r[spec.label_field]).strip():
                raise ContinualFTError(f"{r['_where']}: empty gold answer in field '{spec.label_field}'")
        return [], records
    if spec.source in BUILT_IN:
        available = list(dict.fromkeys(r["label"] for r in records))
        labels = spec.labels or [x for x in DEFAULT_LABELS[spec.source] if x in available]
        missing = [x for x in labels if x not in available]
        if missing:
            raise spec.fail(
                "labels",
                f"'{missing[0]}' has no examples in source {spec.source}; choose from: {', '.join(sorted(available))}",
            )
        return labels, [r for r in records if r["label"] in labels]
    if spec.labels:
        for r in records:
            if str(r[spec.label_field]) not in spec.labels:
                raise ContinualFTError(f"{r['_where']}: label '{r[spec.label_field]}' is not one of {spec.labels}")
        return spec.labels, records
    labels = sorted({str(r[spec.label_field]) for r in records})
    if spec.type is None and len(labels) > max(20, MOSTLY_DISTINCT * len(records)):
        raise spec.fail(
            "labels",
            f"{len(labels)} distinct answers in {len(records)} examples: give labels: for a choice task, "
            "or type: generate",
        )
    return labels, records


def _pools(spec: TaskSpec, records: list[dict], labels: list[str], seed: int) -> dict[str, list[Example]]:
    """Every record as an example (its prompt filled in), in the split its group hashes to."""
    pools: dict[str, list[Example]] = {s: [] for s in SPLITS}
    label_list = ", ".join(labels)
    for r in records:
        values = {k: str(v) for k, v in r.items() if not k.startswith("_")}
        values["labels"] = label_list
        if spec.text_field in r:
            values["text"] = str(r[spec.text_field])
        example = Example(spec.name, spec.prompt.format_map(values), str(r[spec.label_field]), str(r["group"]))
        pools[r.get("_split") or split_of(example.group, seed)].append(example)
    for split in ("train", "test"):
        if not pools[split]:
            raise spec.fail("source", f"task '{spec.name}' has an empty {split} split ({len(records)} examples in all)")
    return pools


def build_task(spec: TaskSpec, seed: int = 0, *, sample: bool = True) -> Task:
    """Load the records, check them, fill the prompt, split by group and sample each split.

    ``sample=False`` keeps every example of each split, in the source's order: the most the
    task's ``sizes`` can ask for.
    """
    records = SOURCES[spec.source](spec, seed)
    if not records:
        raise spec.fail("source", f"task '{spec.name}' has no examples")
    _check_fields(spec, records)
    labels, records = _labels(spec, records)
    if not records:
        raise spec.fail("labels", f"task '{spec.name}' has no examples with labels {labels}")
    pools = _pools(spec, records, labels, seed)
    how = {
        "kind": spec.kind,
        "metrics": tuple(spec.metric_names()),
        "metric": spec.primary_metric(),
        "max_new_tokens": spec.max_new_tokens,
        "stop": tuple(spec.stop or ()),
    }
    if not sample:
        return Task(spec.name, list(labels), pools["train"], pools["validation"], pools["test"], **how)
    _check_sizes_fit(spec, pools, pre_split=any("_split" in r for r in records))
    sizes = {**DEFAULT_SIZES, **spec.sizes}
    balance = spec.balance and spec.kind == "choice"  # free answers have no labels to balance
    out = {s: _sample(pools[s], sizes[s], labels, random.Random(f"{seed}:{spec.name}:{s}"), balance) for s in SPLITS}
    return Task(spec.name, list(labels), out["train"], out["validation"], out["test"], **how)
