"""Every shipped scenario loads; user scenarios from files; each YAML mistake is one clear line."""

import json
import textwrap

import pandas as pd
import pytest
import yaml

from continual_ft.config import make_config
from continual_ft.data.scenario import METRICS, Scenario, list_scenarios, load_scenario, scenario_files
from continual_ft.errors import ContinualFTError

#: Shipped scenario -> its tasks and their sources.
SHIPPED = {
    "legal_then_medical": {"legal": "licenses", "medical": "icd10"},
    "medical_then_legal": {"medical": "icd10", "legal": "licenses"},
    "legal_medical_joint": {"legal": "licenses", "medical": "icd10"},
    "legal_then_medical_gen": {"license_key": "license_rules", "diagnosis_category": "icd10"},
    "mixed_domains": {"legal": "licenses", "diagnosis_category": "icd10", "concept_name": "edam"},
    "three_domains": {"license": "license_rules", "medical": "icd10", "bio": "edam"},
    "license_then_bio": {"license": "license_rules", "bio": "edam"},
}


def test_shipped_scenarios_listed():
    assert sorted(list_scenarios()) == sorted(SHIPPED)
    assert all(list_scenarios().values())


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenario_loads(name, quick):
    first_line = scenario_files()[name].read_text().splitlines()[0]
    assert first_line.startswith(f"# python cli.py run scenario={name}")
    s = load_scenario(name, quick=quick)
    assert isinstance(s, Scenario) and s.name == name and s.metric in METRICS
    assert s.source_file.endswith(f"{name}.yaml")
    assert set(s.tasks) == set(SHIPPED[name])
    declared = yaml.safe_load(scenario_files()[name].read_text())["tasks"]
    assert {t: declared[t]["source"] for t in s.tasks} == SHIPPED[name]
    assert {t for stage in s.stages for t in stage.tasks} == set(s.tasks)
    for task in s.tasks.values():
        assert (len(task.train), len(task.validation), len(task.test)) == ((48, 16, 32) if quick else (600, 64, 150))
        for e in task.train + task.validation + task.test:
            assert e.task == task.name and e.answer.strip()
            if task.generative:  # the model writes its answer: no labels, no options in the prompt
                assert task.labels == [] and e.prompt.endswith(":") and "Options" not in e.prompt
            else:
                assert e.answer in task.labels
                assert e.prompt.endswith("\n\nAnswer:") and ", ".join(task.labels) in e.prompt
        assert not {e.group for e in task.train} & {e.group for e in task.test}


def test_shipped_sizes_and_joint_stage():
    s = load_scenario("legal_medical_joint")
    assert [(st.name, st.tasks) for st in s.stages] == [("joint", ["legal", "medical"])]
    assert {k: (len(t.train), len(t.validation), len(t.test)) for k, t in s.tasks.items()} == {
        "legal": (600, 64, 150),
        "medical": (600, 64, 150),
    }
    assert len(s.tasks["medical"].labels) == 8 and len(s.tasks["legal"].labels) == 5


def test_category_task_keeps_its_name_and_labels():
    # Earlier results (docs/results/README.md, legal → medical) were measured on this task: it stays as it was.
    for name in ("legal_then_medical", "medical_then_legal", "legal_medical_joint"):
        legal = load_scenario(name, quick=True).tasks["legal"]
        assert legal.labels == ["Permissive", "Copyleft", "Copyleft Limited", "Proprietary Free", "Commercial"]
        assert legal.test[0].prompt.startswith("Which kind of software license is this text from?")


def test_three_domains_is_a_longer_stream_with_a_task_that_comes_back():
    s = load_scenario("three_domains", quick=True)
    assert [(st.name, st.tasks) for st in s.stages] == [
        ("license", ["license"]),
        ("medical", ["medical"]),
        ("bio", ["bio"]),
        ("license_again", ["license"]),
    ]
    assert len(set(SHIPPED["three_domains"].values())) == 3  # three domains, from three PyPI data packages
    assert s.tasks["license"].labels == ["mit", "apache-2.0", "bsd-new", "gpl-2.0", "gpl-3.0", "lgpl-2.1"]
    assert s.tasks["medical"].labels == load_scenario("legal_then_medical", quick=True).tasks["medical"].labels
    assert s.tasks["bio"].labels == ["data", "format", "operation", "topic"]
    for task in s.tasks.values():
        assert {e.answer for e in task.test} == set(task.labels)  # balanced: every label is asked


def test_same_seed_same_examples_and_sizes_override():
    a = load_scenario("legal_then_medical", quick=True, seed=7)
    b = load_scenario("legal_then_medical", quick=True, seed=7)
    c = load_scenario("legal_then_medical", quick=True, seed=8)
    for name in a.tasks:
        assert a.tasks[name] == b.tasks[name]
        assert a.tasks[name].train != c.tasks[name].train
    d = load_scenario("medical_then_legal", quick=True, sizes={"train": 10})
    assert [len(t.train) for t in d.tasks.values()] == [10, 10]
    assert [len(t.test) for t in d.tasks.values()] == [32, 32]


def test_readme_size_overrides_load():
    # docs/results/README.md: S="scenario=medical_then_legal data.train_size=300 data.test_size=100 train.lr=2e-3"
    sizes = make_config(["scenario=medical_then_legal", "data.train_size=300", "data.test_size=100"]).data.sizes()
    s = load_scenario("medical_then_legal", sizes=sizes)
    assert {k: (len(t.train), len(t.validation), len(t.test)) for k, t in s.tasks.items()} == {
        "medical": (300, 64, 100),
        "legal": (300, 64, 100),
    }


def write(tmp_path, text, name="my.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_user_scenario_from_files_with_multi_task_stage(tmp_path):
    rows = [{"question": f"2 + {i}?", "answer": str(i % 3), "id": i} for i in range(60)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "math.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "math.parquet")
    path = write(
        tmp_path,
        """\
        # python cli.py run scenario=my.yaml
        description: three copies of a toy task
        metric: exact_match
        tasks:
          a: {source: jsonl, path: data/math.jsonl, text_field: question, label_field: answer, prompt: "{text} ="}
          b:
            {source: csv, path: data/math.csv, label_field: answer, group_field: id, prompt: "{question} =",
             sizes: {train: 5}}
          c:
            source: parquet
            path: math.parquet
            label_field: answer
            labels: ["2", "1", "0"]
            prompt: "#{id}: {question} Options: {labels}."
        stages:
          - {name: first, tasks: [a]}
          - {name: both, tasks: [b, c]}
        """,
    )
    s = load_scenario(path, seed=1)
    assert (s.name, s.metric, s.description) == ("my", "exact_match", "three copies of a toy task")
    assert [(st.name, st.tasks) for st in s.stages] == [("first", ["a"]), ("both", ["b", "c"])]
    assert s.tasks["a"].labels == ["0", "1", "2"] and s.tasks["c"].labels == ["2", "1", "0"]
    assert (
        len(s.tasks["b"].train) == 5
        and sum(len(s.tasks["a"].__dict__[k]) for k in ("train", "validation", "test")) == 60
    )
    example = next(
        e for e in s.tasks["c"].test + s.tasks["c"].train + s.tasks["c"].validation if e.prompt.startswith("#4:")
    )
    assert (example.prompt, example.answer) == ("#4: 2 + 4? Options: 2, 1, 0.", "1")
    assert load_scenario(path, seed=1) == s


TASK = """\
tasks:
  qa:
    source: jsonl
    path: d.jsonl
stages:
  - {name: s, tasks: [qa]}
"""


@pytest.mark.parametrize(
    "text, match",
    [
        ("tasks: [a\nstages: x\n", r"my\.yaml line 2: malformed YAML"),
        (
            "descripton: x\n" + TASK,
            r"my\.yaml line 1 \(descripton\): unknown key; valid keys: description, metric, tasks",
        ),
        ("metric: f1\n" + TASK, r"my\.yaml line 1 \(metric\): unknown metric 'f1'; choose from: accuracy, exact_match"),
        (
            TASK.replace("    path:", "    pth: x\n    path:"),
            r"my\.yaml line 4 \(tasks\.qa\.pth\): unknown task key; valid keys: sou",
        ),
        (
            TASK.replace("jsonl\n", "tsv\n"),
            r"my\.yaml line 3 \(tasks\.qa\.source\): unknown source 'tsv'; choose from: lic",
        ),
        (
            TASK.replace("d.jsonl", "missing.jsonl"),
            r"my\.yaml line 4 \(tasks\.qa\.path\): file not found: .*missing\.jsonl",
        ),
        (TASK.replace("[qa]", "[qa, qb]"), r"my\.yaml line 6 \(stages\.0\.tasks\): unknown task 'qb'; tasks: qa"),
        (
            TASK.replace("path: d.jsonl", "path: d.jsonl\n    sizes: {train: -3}"),
            r"my\.yaml line 5 \(tasks\.qa\.sizes\.train\): must be a positive integer, got -3",
        ),
        (TASK + "quick: {train: 0}\n", r"my\.yaml line 7 \(quick\.train\): must be a positive integer"),
        (
            TASK.replace("path: d.jsonl", "path: d.jsonl\n    prompt: 'Q: {question}'"),
            r"my\.yaml line 5 \(tasks\.qa\.prompt\): placeholder \{question\} is not a field",
        ),
        (TASK.split("stages")[0], r"my\.yaml \(stages\): needs a list of stages"),
        ("- 1\n", r"my\.yaml: expected a mapping"),
    ],
)
def test_yaml_errors_name_file_and_line(tmp_path, text, match):
    (tmp_path / "d.jsonl").write_text('{"text": "hi", "label": "a"}\n' * 3)
    with pytest.raises(ContinualFTError, match=match):
        load_scenario(write(tmp_path, text))


def test_data_errors_through_a_scenario_name_the_data_file(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hi", "label": "a"}\n' * 6 + "{oops\n")
    with pytest.raises(ContinualFTError, match=r"d\.jsonl line 7: invalid JSON"):
        load_scenario(write(tmp_path, TASK))


def test_unknown_name_quick_without_sizes_and_bad_override(tmp_path):
    with pytest.raises(ContinualFTError, match=r"unknown scenario 'legal_then_maths'; shipped: legal_medical_joint"):
        load_scenario("legal_then_maths")
    (tmp_path / "d.jsonl").write_text('{"text": "hi", "label": "a"}\n' * 3)
    with pytest.raises(ContinualFTError, match=r"my\.yaml \(quick\): no `quick:` sizes"):
        load_scenario(write(tmp_path, TASK), quick=True)
    with pytest.raises(ContinualFTError, match=r"sizes override test: must be a positive integer"):
        load_scenario("legal_then_medical", sizes={"test": 0})
    with pytest.raises(ContinualFTError, match=r"cannot read scenario file"):
        load_scenario(str(tmp_path))


def test_sizes_beyond_the_data_name_the_task(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "hi {i}", "label": "a"}}\n' for i in range(20)))
    path = write(tmp_path, TASK + "quick: {train: 500}\n")
    load_scenario(path)  # the default sizes take what there is
    for kw in ({"quick": True}, {"sizes": {"train": 500}}):  # quick: sizes and data.train_size= both ask
        with pytest.raises(ContinualFTError, match=r"^task 'qa': sizes.train=500 but the data holds only 15 train "):
            load_scenario(path, **kw)
