"""Data sources: the built-in corpora split by group, user files in four formats, and their errors."""

import ast
import collections
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from continual_ft.data.sources import NEAR_DUPLICATE, _near_duplicate_groups, _shingles
from continual_ft.data.spec import OPTIONS
from continual_ft.data.tasks import SOURCES, SPLITS, TaskSpec, build_task, icd10_chapter, split_of
from continual_ft.errors import ContinualFTError


def groups(task, split):
    return {e.group for e in getattr(task, split)}


def all_examples(task):
    return task.train + task.validation + task.test


def test_sources_registry():
    assert set(SOURCES) == {"licenses", "license_rules", "icd10", "edam", "jsonl", "csv", "parquet", "hf"}
    assert list(SOURCES) == list(OPTIONS)  # a TaskSpec checks its source against OPTIONS


def imported(module: str) -> set[str]:
    """Every module name an import statement in ``module``'s file mentions, ``if TYPE_CHECKING:`` blocks included."""
    names = set()
    for node in ast.walk(ast.parse(Path(importlib.util.find_spec(module).origin).read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}  # `from pkg import mod` names a module
    return names


def test_loaders_never_import_the_module_that_registers_them():
    assert not imported("continual_ft.data.sources") & {"continual_ft.data.tasks", "continual_ft.data.scenario"}
    above = {"continual_ft.data.tasks", "continual_ft.data.sources", "continual_ft.data.scenario"}
    assert not imported("continual_ft.data.spec") & above
    # Imported first in a fresh process, the loaders come up on their own (an import circle would fail here).
    code = (
        "import continual_ft.data.sources as s, continual_ft.data.tasks as d; assert d.SOURCES['jsonl'] is s.load_jsonl"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_split_of_is_stable_and_near_fractions():
    assert split_of("mit", 0) == split_of("mit", 0)
    counts = collections.Counter(split_of(f"g{i}", 3) for i in range(5000))
    assert 0.66 < counts["train"] / 5000 < 0.74
    assert 0.08 < counts["validation"] / 5000 < 0.12
    assert 0.17 < counts["test"] / 5000 < 0.23
    assert [split_of(f"g{i}", 0) for i in range(50)] != [split_of(f"g{i}", 1) for i in range(50)]


@pytest.fixture(scope="module")
def licenses():
    return build_task(TaskSpec(name="legal", source="licenses"), sample=False)


def test_licenses_split_by_license_key(licenses):
    for a, b in [("train", "test"), ("train", "validation"), ("validation", "test")]:
        assert not groups(licenses, a) & groups(licenses, b)
    assert len(groups(licenses, "train")) > 500


def test_licenses_labels_lengths_and_cap(licenses):
    assert licenses.labels == ["Permissive", "Copyleft", "Copyleft Limited", "Proprietary Free", "Commercial"]
    examples = all_examples(licenses)
    assert {e.answer for e in examples} == set(licenses.labels)
    assert max(collections.Counter(e.group for e in examples).values()) == 3
    texts = [e.prompt.split("\n\nAnswer:")[0] for e in examples]
    assert all(80 <= len(t) <= 400 for t in texts)
    # a paragraph shared by two licenses is dropped, so no text appears twice
    assert len(set(texts)) == len(texts)
    mit = [e for e in examples if e.group == "mit"]
    assert all(e.answer == "Permissive" for e in mit)


def test_licenses_options_and_label_filter():
    spec = TaskSpec(
        name="l",
        source="licenses",
        labels=["Copyleft", "Commercial"],
        options={"max_chars": 120, "max_per_group": 1},
    )
    task = build_task(spec, sample=False)
    examples = all_examples(task)
    assert {e.answer for e in examples} == {"Copyleft", "Commercial"}
    assert all(len(e.prompt) <= 120 + len("\n\nAnswer:") for e in examples)
    assert max(collections.Counter(e.group for e in examples).values()) == 1


def jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def test_near_duplicate_groups_by_hand():
    window = [" ".join(f"w{i}" for i in range(start, start + 20)) for start in (0, 4, 8)]  # overlapping windows
    texts = [window[0], "licensed under the apache license version 2.0", window[1], window[2], "w0 w1 w2 w3"]
    assert jaccard(window[0], window[1]) >= NEAR_DUPLICATE and jaccard(window[1], window[2]) >= NEAR_DUPLICATE
    assert jaccard(window[0], window[2]) < NEAR_DUPLICATE  # joined through window 1 all the same
    assert _near_duplicate_groups(texts) == [0, 1, 0, 0, 4]
    assert _near_duplicate_groups(["MIT License.", "mit license"]) == [0, 0]  # case and punctuation do not count


@pytest.fixture(scope="module")
def license_rules():
    return build_task(TaskSpec(name="license", source="license_rules", prompt="{rule}|{text}"), sample=False)


def text_of(example):
    return example.prompt.split("|", 1)[1]


def test_license_rules_labels_and_split_by_near_duplicate_group(license_rules):
    labels = ["mit", "apache-2.0", "bsd-new", "gpl-2.0", "gpl-3.0", "lgpl-2.1"]
    assert license_rules.labels == labels
    for split in SPLITS:
        counts = collections.Counter(e.answer for e in getattr(license_rules, split))
        assert set(counts) == set(labels) and min(counts.values()) >= (100 if split == "train" else 10)
    for a, b in [("train", "test"), ("train", "validation"), ("validation", "test")]:
        assert not groups(license_rules, a) & groups(license_rules, b)
    examples = all_examples(license_rules)
    assert all(e.group.startswith(e.answer + ":") for e in examples)
    assert max(collections.Counter(e.group for e in examples).values()) == 2
    texts = [text_of(e) for e in examples]
    assert all(40 <= len(t) <= 400 for t in texts) and len(set(texts)) == len(texts)
    # The point of the groups: no test text has a near-duplicate of its own license in training.
    train = collections.defaultdict(list)
    for e in license_rules.train:
        train[e.answer].append(_shingles(text_of(e)))
    for e in license_rules.test:
        mine = _shingles(text_of(e))
        assert all(len(mine & t) / len(mine | t) < NEAR_DUPLICATE for t in train[e.answer]), e.prompt


def test_license_rules_fold_plus_and_skip_multi_license_rules():
    spec = TaskSpec(
        name="l",
        source="license_rules",
        prompt="{rule}|{text}",
        labels=["gpl-2.0", "apache-2.0", "gpl-1.0"],
        options={"max_per_group": 10_000},
    )
    by_rule = {e.prompt.split("|")[0]: e for e in all_examples(build_task(spec, sample=False))}
    assert by_rule["gpl-2.0-plus_10"].answer == "gpl-2.0"  # "GPL version 2 (or any later version)"
    assert "GPL version 2 (or any later version)" in by_rule["gpl-2.0-plus_10"].prompt
    assert by_rule["apache-2.0_30"].answer == "apache-2.0"
    assert by_rule["gpl-1.0-plus_1"].answer == "gpl-1.0"
    records = SOURCES["license_rules"](TaskSpec(name="l", source="license_rules", options={"max_per_group": 10_000}), 0)
    assert all(" " not in r["label"] and not r["label"].endswith("-plus") for r in records)
    rules = {r["rule"] for r in records}
    assert "gpl-2.0_or_bsd-new_17" not in rules  # "gpl-2.0 OR bsd-new": several licenses
    assert "gpl-2.0_1111" in rules  # "licensed under the terms of the GNU General Public License (GPL) version 2"
    with pytest.raises(ContinualFTError, match=r"'gpl-2.0-plus' has no examples in source license_rules"):
        build_task(TaskSpec(name="l", source="license_rules", labels=["gpl-2.0-plus"]))


@pytest.fixture(scope="module")
def edam():
    return build_task(TaskSpec(name="bio", source="edam", prompt="{name}|{text}"), sample=False)


def test_edam_branches_split_by_parent_concept(edam):
    assert edam.labels == ["data", "format", "operation", "topic"]
    for split in SPLITS:
        assert {e.answer for e in getattr(edam, split)} == set(edam.labels)
    for a, b in [("train", "test"), ("train", "validation"), ("validation", "test")]:
        assert not groups(edam, a) & groups(edam, b)
    examples = all_examples(edam)
    assert len(examples) > 1200 and max(collections.Counter(e.group for e in examples).values()) == 6
    assert all(e.group.split("_")[0] in edam.labels for e in examples)


def test_edam_known_concept_lands_with_its_branch_and_parent():
    spec = TaskSpec(name="bio", source="edam", prompt="{name}|{text}", options={"max_per_group": 10_000})
    by_name = {e.prompt.split("|")[0]: e for e in all_examples(build_task(spec, sample=False))}
    checksum = by_name["Sequence checksum generation"]
    assert (checksum.prompt, checksum.answer, checksum.group) == (
        "Sequence checksum generation|Generate a checksum of a molecular sequence.",
        "operation",
        "operation_3429",
    )
    assert by_name["BAM"].answer == "format" and by_name["Laboratory animal science"].answer == "topic"
    assert "Index format" not in by_name  # obsolete


@pytest.mark.parametrize(
    "code, chapter",
    [
        ("A000", "infectious"),
        ("B99", "infectious"),
        ("C50911", "neoplasm"),
        ("D3A010", "neoplasm"),
        ("D500", "blood"),
        ("F0150", "mental"),
        ("H6590", "ear"),
        ("I10", "circulatory"),
        ("J45909", "respiratory"),
        ("O9A311", "pregnancy"),
        ("S72001A", "injury"),
        ("T7840XA", "injury"),
        ("V0010XA", "external"),
        ("Z3A01", "health factors"),
        ("I1.0", "circulatory"),
    ],
)
def test_icd10_chapter_by_hand(code, chapter):
    assert icd10_chapter(code) == chapter


@pytest.fixture(scope="module")
def icd10():
    return build_task(TaskSpec(name="medical", source="icd10"), sample=False)


def test_icd10_split_by_category_and_answers_match_range(icd10):
    for a, b in [("train", "test"), ("train", "validation"), ("validation", "test")]:
        assert not groups(icd10, a) & groups(icd10, b)
    examples = all_examples(icd10)
    assert all(len(e.group) == 3 and icd10_chapter(e.group) == e.answer for e in examples)
    assert max(collections.Counter(e.group for e in examples).values()) == 4
    assert "special" not in icd10.labels  # no billable U codes in the data: not offered as a label
    assert len(icd10.labels) == 21


def test_icd10_known_code_lands_with_its_chapter():
    spec = TaskSpec(
        name="m",
        source="icd10",
        prompt="{code}|{text}",
        options={"max_per_group": 10_000},
        labels=["circulatory", "injury", "infectious"],
    )
    by_code = {e.prompt.split("|")[0]: e for e in all_examples(build_task(spec, sample=False))}
    assert by_code["A000"].answer == "infectious" and by_code["A000"].prompt.endswith("biovar cholerae")
    assert by_code["I10"].answer == "circulatory" and by_code["I10"].group == "I10"
    assert by_code["S72001A"].answer == "injury" and by_code["S72001A"].group == "S72"


def test_balance_evens_out_labels():
    task = build_task(
        TaskSpec(
            name="m",
            source="icd10",
            sizes={"train": 80, "validation": 8, "test": 40},
            labels=["infectious", "injury", "mental", "respiratory"],
        )
    )
    counts = collections.Counter(e.answer for e in task.train)
    assert set(counts.values()) == {20}
    assert len(task.test) == 40 and len(task.validation) == 8


def test_same_seed_same_examples_other_seed_differs():
    spec = dict(name="legal", source="licenses", sizes={"train": 30, "validation": 5, "test": 10})
    a, b = build_task(TaskSpec(**spec), seed=1), build_task(TaskSpec(**spec), seed=1)
    c = build_task(TaskSpec(**spec), seed=2)
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    assert a.train != c.train


# ---- user files ---------------------------------------------------------------------------------

ROWS = [{"q": f"question {i}", "y": "yes" if i % 2 else "no", "topic": f"t{i % 10}"} for i in range(200)]


def user_spec(tmp_path, source, **kw):
    kw.setdefault("prompt", "Q: {text} ({topic})\nA:")
    return TaskSpec(name="qa", source=source, text_field="q", label_field="y", base_dir=str(tmp_path), **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("source", ["jsonl", "csv", "parquet"])
def test_user_file_split_by_group_field(tmp_path, source):
    name = f"data.{source}"
    if source == "jsonl":
        write_jsonl(tmp_path / name, ROWS)
    elif source == "csv":
        pd.DataFrame(ROWS).to_csv(tmp_path / name, index=False)
    else:
        pd.DataFrame(ROWS).to_parquet(tmp_path / name)
    task = build_task(user_spec(tmp_path, source, path=name, group_field="topic"), sample=False)
    assert task.labels == ["no", "yes"]  # sorted set when `labels:` is omitted
    assert sum(len(getattr(task, s)) for s in SPLITS) == 200
    assert not groups(task, "train") & groups(task, "test")
    assert groups(task, "train") <= {f"t{i}" for i in range(10)}
    e = next(e for e in task.test if e.prompt.startswith("Q: question 3 "))
    assert (e.prompt, e.answer, e.group, e.task) == ("Q: question 3 (t3)\nA:", "yes", "t3", "qa")


def test_row_groups_do_not_depend_on_the_folder(tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        write_jsonl(tmp_path / folder / "d.jsonl", ROWS)
    one, two = (build_task(user_spec(tmp_path / f, "jsonl", path="d.jsonl", prompt="{text}")) for f in ("one", "two"))
    assert (one.train, one.test) == (two.train, two.test)


def test_pre_split_files_and_row_groups(tmp_path):
    write_jsonl(tmp_path / "tr.jsonl", ROWS[:150])
    write_jsonl(tmp_path / "te.jsonl", ROWS[150:])
    task = build_task(user_spec(tmp_path, "jsonl", files={"train": "tr.jsonl", "test": "te.jsonl"}), sample=False)
    assert len(task.train) == 150 and len(task.test) == 50 and task.validation == []
    assert all(e.group.endswith(f"line {int(e.prompt.split()[2]) + 1}") for e in task.train)  # each row its own group


def test_hf_from_disk_and_dataset_name(tmp_path, monkeypatch):
    import datasets

    ds = datasets.Dataset.from_dict({k: [r[k] for r in ROWS] for k in ROWS[0]})
    ds.save_to_disk(str(tmp_path / "hfdata"))
    task = build_task(user_spec(tmp_path, "hf", path="hfdata", group_field="topic", labels=["yes", "no"]), sample=False)
    assert task.labels == ["yes", "no"] and len(all_examples(task)) == 200
    assert not groups(task, "train") & groups(task, "test")

    datasets.DatasetDict({"train": ds.select(range(150)), "test": ds.select(range(150, 200))}).save_to_disk(
        str(tmp_path / "hfdict")
    )
    task = build_task(user_spec(tmp_path, "hf", path="hfdict", splits={"train": "train", "test": "test"}), sample=False)
    assert (len(task.train), len(task.test)) == (150, 50)

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or ds)
    build_task(user_spec(tmp_path, "hf", dataset="someone/qa", config="en", group_field="topic"))
    assert calls == [(("someone/qa", "en"), {"split": "train"})]


# ---- errors -------------------------------------------------------------------------------------


def test_asking_for_more_than_a_split_holds_is_one_line(tmp_path):
    write_jsonl(tmp_path / "product.jsonl", ROWS[:20])  # one group per row: 15 train, 1 validation, 4 test
    spec = dict(name="product", source="jsonl", path="product.jsonl", text_field="q", label_field="y", prompt="{text}")
    everything = build_task(TaskSpec(**spec, base_dir=str(tmp_path)), sample=False)
    held = {s: len(getattr(everything, s)) for s in SPLITS}
    assert held == {"train": 15, "validation": 1, "test": 4}
    defaults = build_task(TaskSpec(**spec, base_dir=str(tmp_path)))  # 500/64/150 are "up to": they take what there is
    assert {s: len(getattr(defaults, s)) for s in SPLITS} == held
    exact = build_task(TaskSpec(**spec, base_dir=str(tmp_path), sizes=held))
    assert {s: len(getattr(exact, s)) for s in SPLITS} == held
    with pytest.raises(ContinualFTError) as e:
        build_task(TaskSpec(**spec, base_dir=str(tmp_path), sizes={"train": 500}))
    assert str(e.value) == (
        "task 'product': sizes.train=500 but the data holds only 15 train examples "
        "(of 20 in all, split 70/10/20 by group into train/validation/test)"
    )
    with pytest.raises(ContinualFTError, match=r"^task 'product': sizes.validation=2 but the data holds only 1 "):
        build_task(TaskSpec(**spec, base_dir=str(tmp_path), sizes={"validation": 2}))


def test_asking_for_more_than_a_pre_split_file_holds(tmp_path):
    write_jsonl(tmp_path / "tr.jsonl", ROWS[:15])
    write_jsonl(tmp_path / "te.jsonl", ROWS[15:20])
    spec = user_spec(tmp_path, "jsonl", files={"train": "tr.jsonl", "test": "te.jsonl"}, sizes={"validation": 8})
    with pytest.raises(ContinualFTError) as e:
        build_task(spec)
    assert str(e.value) == (
        "task 'qa': sizes.validation=8 but the data holds only 0 validation examples "
        "(pre-split: 15/0/5 in train/validation/test)"
    )
    assert "\n" not in str(e.value)


def test_hf_load_failure_is_one_line(tmp_path, monkeypatch):
    import datasets

    def boom(*a, **kw):
        raise FileNotFoundError("Couldn't find dataset 'someone/qa' on the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(ContinualFTError, match=r"field 'dataset'.*someone/qa.*Couldn't find dataset[^\n]*$"):
        build_task(user_spec(tmp_path, "hf", dataset="someone/qa"))
    with pytest.raises(ContinualFTError, match=r"field 'path'.*file not found.*nowhere"):
        build_task(user_spec(tmp_path, "hf", path="nowhere"))


def test_malformed_jsonl_line(tmp_path):
    rows = [json.dumps(r) for r in ROWS[:10]]
    rows[6] = '{"q": "broken", "y": '
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ContinualFTError, match=r"d\.jsonl line 7: invalid JSON"):
        build_task(user_spec(tmp_path, "jsonl", path="d.jsonl"))


def test_missing_field_in_record(tmp_path):
    rows = [dict(r) for r in ROWS[:10]]
    del rows[4]["y"]
    write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ContinualFTError, match=r"d\.jsonl line 5: missing field 'y'"):
        build_task(user_spec(tmp_path, "jsonl", path="d.jsonl"))


@pytest.mark.parametrize("source", ["csv", "parquet"])
def test_missing_column(tmp_path, source):
    frame = pd.DataFrame(ROWS).drop(columns=["y"])
    frame.to_csv(tmp_path / "d.csv", index=False) if source == "csv" else frame.to_parquet(tmp_path / "d.parquet")
    with pytest.raises(ContinualFTError, match=rf"d\.{source}: missing column 'y' \(columns: q, topic\)"):
        build_task(user_spec(tmp_path, source, path=f"d.{source}"))


def test_unknown_label_in_data(tmp_path):
    pd.DataFrame(ROWS[:10]).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ContinualFTError, match=r"d\.csv line 3: label 'yes' is not one of \['no', 'maybe'\]"):
        build_task(user_spec(tmp_path, "csv", path="d.csv", labels=["no", "maybe"]))


def test_placeholder_not_a_field(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ROWS[:10])
    with pytest.raises(ContinualFTError, match=r"field 'prompt'.*\{context\} is not a field.*q, y, topic"):
        build_task(user_spec(tmp_path, "jsonl", path="d.jsonl", prompt="{context} {text}"))
    with pytest.raises(ContinualFTError, match=r"field 'prompt'.*malformed template"):
        user_spec(tmp_path, "jsonl", path="d.jsonl", prompt="{text")


def test_unreadable_data_file(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"q,y\n\xff\xfe,1\n")
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(ContinualFTError, match=r"d\.csv: cannot read \(UnicodeDecodeError"):
        build_task(user_spec(tmp_path, "csv", path="d.csv", prompt="{text}"))
    with pytest.raises(ContinualFTError, match=r"folder\.jsonl: cannot read \(IsADirectoryError"):
        build_task(user_spec(tmp_path, "jsonl", path="folder.jsonl"))


def test_empty_task_and_empty_test_split(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ContinualFTError, match=r"task 'qa' has no examples"):
        build_task(user_spec(tmp_path, "jsonl", path="empty.jsonl"))
    write_jsonl(tmp_path / "tr.jsonl", ROWS[:10])
    with pytest.raises(ContinualFTError, match=r"task 'qa' has an empty test split"):
        build_task(user_spec(tmp_path, "jsonl", files={"train": "tr.jsonl", "test": "empty.jsonl"}))


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            {"source": "tsv"},
            r"field 'source'.*unknown source 'tsv'; choose from: licenses, license_rules, icd10, edam, jsonl, csv, "
            r"parquet, hf$",
        ),
        ({"sizes": {"train": 0}}, r"field 'sizes.train'.*positive integer, got 0"),
        ({"sizes": {"dev": 5}}, r"field 'sizes.dev'.*unknown split"),
        ({"options": {"max_chars": 10}}, r"field 'options.max_chars'.*unknown option for source jsonl; valid: none"),
        ({"labels": ["a", "a"]}, r"field 'labels'.*twice"),
        ({"path": None}, r"field 'path'.*exactly one of `path:` or `files:`"),
        ({"files": {"train": "a", "dev": "b"}, "path": None}, r"field 'files'.*must map"),
    ],
)
def test_spec_checks(tmp_path, kw, match):
    args = dict(source="jsonl", path="d.jsonl") | kw
    with pytest.raises(ContinualFTError, match=match):
        TaskSpec(name="qa", base_dir=str(tmp_path), **args)


def test_built_in_rejects_file_fields_and_unknown_labels():
    with pytest.raises(ContinualFTError, match=r"field 'path'.*does not apply to the built-in source icd10"):
        TaskSpec(name="m", source="icd10", path="x.jsonl")
    with pytest.raises(ContinualFTError, match=r"field 'labels'.*'cardiac' has no examples in source icd10"):
        build_task(TaskSpec(name="m", source="icd10", labels=["circulatory", "cardiac"]))
