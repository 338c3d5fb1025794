"""lm-eval in the general block, the pure-Python half (services/evaluation/lm_eval_tasks.py, lm_eval_run.py): local task files checked
as lm-eval loads them (file and line in every refusal), task names against the pinned lm-eval's index, samples
turned into tests, task metrics, the model arguments per device; and the comparison's per-task deltas."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from services.core.errors import InvalidArgument
from services.evaluation import lm_eval_run as R
from services.evaluation import lm_eval_tasks as T
from services.evaluation.scoring import compare, lm_eval_deltas

FACTS = [{"id": f"c{i}", "answer": a, "category": "capital", "sentence": f"The capital of {c} is {a}."}
         for i, (c, a) in enumerate([("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"),
                                     ("Spain", "Madrid"), ("Italy", "Rome")])]

GEN = {"task": "gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "d.jsonl"}},
       "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}",
       "generation_kwargs": {"until": ["."]}, "metric_list": [{"metric": "exact_match"}]}
ROWS = b'{"q": "1+1=", "a": "2"}\n{"q": "2+2=", "a": "4"}\n\n{"q": "3+3=", "a": "6"}\n'


def files(cfg=None, **extra) -> dict[str, bytes]:
    return {"gen.yaml": yaml.safe_dump(cfg or GEN).encode(), "d.jsonl": ROWS, **extra}


def refused(fs, *words):
    with pytest.raises(InvalidArgument) as e:
        T.load_task_files(fs, "tasks")
    for w in words:
        assert w in str(e.value), str(e.value)
    return str(e.value)


def test_the_index_is_the_pinned_lm_eval_and_knows_its_standard_tasks():
    index = T.standard_index()
    assert index.version == T.LM_EVAL_VERSION
    assert index.kind("hellaswag") == "task" and index.output_types("hellaswag") == {"multiple_choice"}
    assert index.kind("mmlu") == "group" and index.output_types("gsm8k") == {"generate_until"}
    assert {"doc_to_text", "metric_list", "dataset_kwargs"} <= index.task_keys
    assert {"acc", "acc_norm", "exact_match"} <= index.metrics and "remove_whitespace" in index.filters


def test_fact_sentences_become_a_multiple_choice_task_lm_eval_can_load():
    fs = T.fact_task_files(FACTS, choices=3, seed=1)
    docs = [json.loads(line) for line in fs["fact_sentences.jsonl"].decode().splitlines()]
    assert len(docs) == 5 and docs[0]["context"] == "The capital of France is"
    assert all(len(d["choices"]) == 3 and d["choices"][d["label"]] == f["answer"] for d, f in zip(docs, FACTS))
    assert T.fact_task_files(FACTS, choices=3, seed=1) == fs  # seeded
    tf = T.load_task_files(fs, "facts")
    [task] = tf.tasks.values()
    assert (task.name, task.kind, task.docs, task.output_types) == ("fact_sentences", "task", 5,
                                                                    {"multiple_choice"})
    assert T.resolve([], tf) == [T.Resolved("fact_sentences", "local", frozenset({"multiple_choice"}), False)]


def test_a_valid_generate_task_counts_its_documents():
    tf = T.load_task_files(files(), "tasks")
    assert tf.tasks["gen"].docs == 3 and tf.tasks["gen"].split == "test" and not tf.tasks["gen"].hub
    assert tf.sha256() == T.load_task_files(files(), "elsewhere").sha256()  # content, not where it came from
    assert tf.sha256() != T.load_task_files(files(**{"d.jsonl": ROWS + b'{"q": "x", "a": "y"}\n'}), "t").sha256()


def test_malformed_yaml_names_the_file_and_line():
    refused({"gen.yaml": b"task: gen\ndataset_path: [json\n", "d.jsonl": ROWS}, "tasks/gen.yaml",
            "malformed YAML at line 3")


@pytest.mark.parametrize("change,words", [
    ({"doc_to_txt": "{{q}}"}, ["gen.yaml: task 'gen'.doc_to_txt", "did you mean 'doc_to_text'"]),
    ({"output_type": "multiple_choice"}, ["doc_to_choice", "is required for a multiple_choice task"]),
    ({"output_type": "ranking"}, ["'ranking' is not one of"]),
    ({"metric_list": [{"metric": "accuracy"}]}, ["unknown metric 'accuracy'"]),
    ({"metric_list": [{"metric": "acc", "aggregation": "avg"}]}, ["unknown aggregation 'avg'"]),
    ({"filter_list": [{"name": "x", "filter": [{"function": "strip"}]}]}, ["unknown filter 'strip'"]),
    ({"class": "MyTask"}, ["Python task classes are not supported"]),
    ({"dataset_kwargs": {"data_files": {"test": "missing.jsonl"}}}, ["missing.jsonl is not among the task files"]),
    ({"dataset_kwargs": {"data_files": {"test": "../d.jsonl"}}}, ["must be a relative path"]),
    ({"dataset_kwargs": {}}, ["data_files", "is required for a local dataset"]),
    ({"test_split": "validation"}, ["split 'validation' is not in dataset_kwargs.data_files"]),
    ({"test_split": None}, ["test_split", "is required"]),
    ({"doc_to_target": None}, ["doc_to_target", "is required"]),
    ({"process_docs": "x"}, []),  # accepted (a plain value): checked by lm-eval itself
])
def test_task_config_refusals_say_what_to_fix(change, words):
    cfg = {**GEN, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    if not words:
        assert T.load_task_files(files(cfg), "tasks").tasks["gen"].docs is None  # process_docs may change the count
        return
    refused(files(cfg), *words)


def test_data_files_are_checked_row_by_row():
    refused(files(**{"d.jsonl": b'{"q": "a", "a": "b"}\n{"q": oops}\n'}), "tasks/d.jsonl: line 2: malformed JSON")
    refused(files(**{"d.jsonl": b'{"q": "a", "a": "b"}\n[1, 2]\n'}), "line 2: a row must be a JSON object")
    refused(files(**{"d.jsonl": b"\n\n"}), "its 'test' split (d.jsonl) has no rows: zero tests")
    cfg = {**GEN, "dataset_path": "csv", "dataset_kwargs": {"data_files": {"test": "d.csv"}}}
    assert T.load_task_files({"gen.yaml": yaml.safe_dump(cfg).encode(), "d.csv": b"q,a\n1+1=,2\n"},
                             "t").tasks["gen"].docs == 1
    cfg = {**GEN, "dataset_kwargs": {"data_files": {"test": "d.json"}}}
    assert T.load_task_files({"gen.yaml": yaml.safe_dump(cfg).encode(), "d.json": b'[{"q": 1, "a": 2}]'},
                             "t").tasks["gen"].docs == 1


def test_file_names_and_shapes():
    refused({"gen.yml": b"task: gen\n"}, "only reads task configs named *.yaml")
    refused({"gen.yaml": b"task: gen\n", "run.sh": b"rm -rf /"}, "run.sh", "unsupported file type")
    refused({"/etc/gen.yaml": b"task: gen\n"}, "must be a relative path")
    refused({"d.jsonl": ROWS}, "holds no task config")
    refused({"x.yaml": b"- 1\n- 2\n"}, "a task config is a YAML mapping")
    refused({"x.yaml": b"dataset_path: json\n", "d.jsonl": ROWS}, "defines neither `task`")
    refused({"a.yaml": yaml.safe_dump(GEN).encode(), "b.yaml": yaml.safe_dump(GEN).encode(), "d.jsonl": ROWS},
            "task 'gen' is also defined in a.yaml")
    with pytest.raises(InvalidArgument, match="has no files"):
        T.load_task_files({}, "tasks")


def test_includes_merge_like_lm_eval_and_a_template_file_may_define_no_task():
    base = {k: v for k, v in GEN.items() if k != "task"}
    fs = {"_template.yaml": yaml.safe_dump(base).encode(), "sub/d.jsonl": ROWS,
          "one.yaml": b"include: _template.yaml\ntask: one\ndataset_kwargs: {data_files: {test: sub/d.jsonl}}\n",
          "two.yaml": b"include: _template.yaml\ntask: two\ndataset_kwargs: {data_files: {test: sub/d.jsonl}}\n"
                      b"doc_to_target: '{{q}}'\n"}
    tf = T.load_task_files(fs, "t")
    assert sorted(tf.leaf_tasks()) == ["one", "two"] and tf.tasks["one"].docs == 3
    refused({**fs, "three.yaml": b"include: nope.yaml\ntask: three\n"}, "nope.yaml is not among the task files")
    refused({"a.yaml": b"include: b.yaml\ntask: a\n", "b.yaml": b"include: a.yaml\n"}, "include cycle")


def test_function_helpers_must_ship_beside_the_yaml():
    cfg = {**GEN, "process_results": "!function utils.score"}
    text = yaml.safe_dump(cfg).replace("'!function utils.score'", "!function utils.score").encode()
    refused({"gen.yaml": text, "d.jsonl": ROWS}, "utils.py is not among the task files")
    assert T.load_task_files({"gen.yaml": text, "d.jsonl": ROWS, "utils.py": b"def score(d, r): return {}\n"}, "t")


def test_groups_hub_datasets_and_resolution():
    group = b"group: both\ntask:\n  - gen\n  - hellaswag\n"
    tf = T.load_task_files(files(**{"group.yaml": group}), "t")
    assert tf.tasks["both"].kind == "group" and tf.tasks["both"].output_types == {"generate_until",
                                                                                   "multiple_choice"}
    [r] = T.resolve(["both"], tf)
    assert r.source == "local" and r.hub  # hellaswag comes from the hub
    refused(files(**{"group.yaml": b"group: g\ntask: [gen, nosuchtask]\n"}), "unknown task 'nosuchtask'")
    hub = {**GEN, "dataset_path": "org/some-dataset"}
    hub.pop("dataset_kwargs")
    assert T.resolve(["gen"], T.load_task_files({"gen.yaml": yaml.safe_dump(hub).encode()}, "t"))[0].hub
    evm = {**GEN, "metric_list": [{"metric": "rouge", "hf_evaluate": True}]}
    assert T.load_task_files(files(evm), "t").tasks["gen"].hub == "evaluate metrics rouge"
    std = T.resolve(["arc_easy", "gen"], tf)
    assert [(x.name, x.source, x.hub) for x in std] == [("arc_easy", "standard", True), ("gen", "local", False)]


@pytest.mark.parametrize("names,words", [
    (["helaswag"], "did you mean hellaswag"),
    (["gen", "gen"], "listed twice"),
    (["bad name!"], "is not an lm-eval task name"),
    ([], "names no task"),
])
def test_task_names_are_resolved_or_refused_with_suggestions(names, words):
    with pytest.raises(InvalidArgument, match=words):
        T.resolve(names, None if not names or names == ["helaswag"] else T.load_task_files(files(), "t"))


# samples as lm-eval 0.4.13's simple_evaluate returns them (log_samples=True), before the tracker saves them
MC_SAMPLE = {"doc_id": 0, "doc": {}, "target": 0, "filter": "none", "metrics": ["acc", "acc_norm"],
             "arguments": [["The capital of France is", " Paris"], ["The capital of France is", " London"]],
             "resps": [[[-3.0, True]], [[-5.0, False]]], "filtered_resps": [[-3.0, True], [-5.0, False]],
             "acc": 1.0, "acc_norm": 1.0}


def test_samples_a_binary_metric_scores_become_general_tests():
    cfg = {"output_type": "multiple_choice", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    wrong = {**MC_SAMPLE, "doc_id": 1, "filtered_resps": [[-9.0, False], [-1.0, True]], "acc": 0.0}
    [a, b] = R.sample_tests("facts", [MC_SAMPLE, wrong], cfg)
    assert a == {"id": "lm-eval/facts/0", "block": "general", "prompt": "The capital of France is",
                 "output": "Paris", "passed": True, "expected": "Paris", "latency_ms": 0.0, "reason": ""}
    assert (b["output"], b["passed"], b["reason"]) == ("London", False, "acc 0 (expected 'Paris')")
    gen_cfg = {"output_type": "generate_until", "metric_list": [{"metric": "exact_match"}]}
    gen = [{"doc_id": 3, "target": "4", "filter": "strict", "arguments": [["2+2=", {"until": ["."]}]],
            "filtered_resps": ["4"], "exact_match": 1.0},
           {"doc_id": 3, "target": "4", "filter": "flexible", "arguments": [["2+2=", {}]], "filtered_resps": ["5"],
            "exact_match": 0.0}]
    [g] = R.sample_tests("math", gen, gen_cfg)  # the first filter only
    assert (g["id"], g["output"], g["passed"]) == ("lm-eval/math/3", "4", True)
    rolling = [{"doc_id": 0, "filter": "none", "arguments": [["text"]], "word_perplexity": 12.5}]
    assert R.sample_tests("wiki", rolling, {"output_type": "loglikelihood_rolling"}) == []


def test_task_summaries_read_lm_evals_results():
    results = {"results": {"facts": {"alias": "facts", "acc,none": 0.75, "acc_stderr,none": 0.1,
                                     "acc_norm,none": 0.5, "acc_norm_stderr,none": "N/A", "sample_len": 4}},
               "configs": {"facts": {"output_type": "multiple_choice", "metric_list": [{"metric": "acc"}]}},
               "n-shot": {"facts": 0}, "n-samples": {"facts": {"original": 4, "effective": 4}},
               "versions": {"facts": 1}, "higher_is_better": {"facts": {"acc": True, "acc_norm": True}}}
    s = R.task_summaries(results, {"facts": "local"})["facts"]
    assert (s["primary"], s["value"], s["primary_stderr"], s["n"], s["source"]) == ("acc", 0.75, 0.1, 4, "local")
    assert s["metrics"] == {"acc": 0.75, "acc_norm": 0.5} and s["higher_is_better"] is True


def test_model_args_per_device_and_tokenizer():
    local = R.model_args(base_url="http://127.0.0.1:9/v1", model="m", tokenizer="/models/m", max_length=512,
                         seed=3, device="cpu")
    assert local["base_url"] == "http://127.0.0.1:9/v1/completions" and local["tokenizer_backend"] == "huggingface"
    assert local["num_concurrent"] == 1 and local["tokenized_requests"] and local["seed"] == 3
    gpu = R.model_args(base_url="http://h/v1", model="m", tokenizer="/m", max_length=4096, seed=0, device="cuda")
    assert gpu["num_concurrent"] == 8 and gpu["max_length"] == 4096
    remote = R.model_args(base_url="http://h/v1", model="m", tokenizer=None, max_length=2048, seed=0, device="cpu",
                          remote_tokenizer=True, api_key="k")
    assert remote["tokenizer_backend"] == "remote" and remote["header"] == {"Authorization": "Bearer k"}
    none = R.model_args(base_url="http://h/v1", model="m", tokenizer=None, max_length=2048, seed=0, device="cpu")
    assert none["tokenizer_backend"] == "none" and not none["tokenized_requests"]


def _report(value, stderr, higher=True, primary="acc"):
    task = {"primary": primary, "value": value, "primary_stderr": stderr, "higher_is_better": higher}
    return {"controls": {}, "blocks": {"general": {"passed": 1, "total": 2, "pass_rate": 0.5}},
            "tests": [{"id": "t", "block": "general", "passed": True, "output": str(value)}],
            "lm_eval": {"version": "0.4.13", "tasks": {"facts": task}}}


def test_lm_eval_deltas_have_intervals_and_a_direction():
    [d] = lm_eval_deltas(_report(0.9, 0.02), _report(0.6, 0.03))
    assert d["delta"] == pytest.approx(-0.3) and d["worse"] and d["ci_high"] < 0
    [d] = lm_eval_deltas(_report(0.9, 0.2), _report(0.8, 0.2))
    assert not d["worse"] and d["ci_low"] < 0 < d["ci_high"]  # within the noise
    [d] = lm_eval_deltas(_report(10.0, 0.5, False, "word_perplexity"), _report(14.0, 0.5, False, "word_perplexity"))
    assert d["worse"]  # perplexity went up: lower is better
    [d] = lm_eval_deltas(_report(0.9, None), _report(0.1, None))
    assert not d["worse"] and d["ci_low"] == d["ci_high"] == d["delta"]  # no standard errors: no claim
    assert lm_eval_deltas(_report(0.9, 0.1), _report(0.9, 0.1, primary="acc_norm")) == []
    c = compare(_report(0.9, 0.02), _report(0.6, 0.03))
    assert c.lm_eval_deltas and any("lm-eval facts acc: 0.900 → 0.600" in r and "worse beyond the noise" in r
                                    for r in c.verdict_reasons)


def test_lm_eval_pass_rates_get_newcombe_intervals_even_at_100_percent():
    def rep(passed, n):
        r = _report(passed / n, 0.0)
        r["tests"] = [{"id": f"lm-eval/facts/{i}", "block": "general", "passed": i < passed, "output": ""}
                      for i in range(n)]
        return r

    [same] = lm_eval_deltas(rep(40, 40), rep(40, 40))
    assert same["delta"] == 0 and same["ci_low"] < -0.05 and same["ci_high"] > 0.05 and not same["worse"]
    [drop] = lm_eval_deltas(rep(40, 40), rep(20, 40))
    assert drop["delta"] == pytest.approx(-0.5) and drop["worse"] and drop["ci_high"] < 0


def test_includes_may_climb_within_the_root_but_not_above_it():
    base = {k: v for k, v in GEN.items() if k != "task"}
    fs = {"_template.yaml": yaml.safe_dump(base).encode(), "d.jsonl": ROWS,
          "sub/one.yaml": b"include: ../_template.yaml\ntask: one\n"}
    assert T.load_task_files(fs, "t").tasks["one"].docs == 3
    refused({**fs, "sub/one.yaml": b"include: ../../_template.yaml\ntask: one\n"}, "above their root")


def test_an_unreachable_hub_puts_the_worker_offline_at_once(monkeypatch, tmp_path):
    """Standard tasks on a worker that cannot reach the hub load from the datasets cache or fail at once, instead
    of huggingface_hub's retries (~30 s a request); a reachable hub is used."""
    import socket

    from services.core.net import free_port

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert not R.hub_reachable(timeout_s=1.0)
    assert R.prepare_environment(tmp_path, hub=True) is False
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var)
    with socket.socket() as listener:  # a hub that answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert R.prepare_environment(tmp_path, hub=True) is True
        assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    assert R.prepare_environment(tmp_path, hub=False) is False  # local tasks never reach for the network
    assert os.environ["HF_HUB_OFFLINE"] == "1"
