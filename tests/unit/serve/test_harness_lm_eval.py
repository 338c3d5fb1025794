"""services/evaluation/lm_eval_tasks.py and lm_eval_run.py against the real lm-eval of the serve venv: the committed task index is this
lm-eval's; task files the control plane accepts are loaded by lm-eval itself (offline, with the documents the
control plane counted), and one it refuses is refused by lm-eval too; the model arguments build lm-eval's
local-completions model; a standard task on an offline worker fails with the hub message.

    infra/scripts/loopback.sh .venvs/serve/bin/python -m pytest -q -p no:cacheprovider tests/unit/serve
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import yaml

try:
    import lm_eval
except ImportError as exc:  # pragma: no cover - depends on the interpreter
    pytest.skip(f"needs lm-eval ({exc}); run with the serve venv", allow_module_level=True)

from services.core.errors import FailedPrecondition
from services.evaluation import lm_eval_run as R
from services.evaluation import lm_eval_tasks as T

REPO = Path(__file__).resolve().parents[3]
FOUNDATION = REPO / "fixtures" / "foundation"
GEN = {"task": "fact_gen", "dataset_path": "json",
       "dataset_kwargs": {"data_files": {"test": "fact_sentences.jsonl"}}, "test_split": "test",
       "output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "{{choices[label]}}",
       "generation_kwargs": {"until": ["."], "max_gen_toks": 8},
       "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
       "metric_list": [{"metric": "exact_match", "ignore_case": True}]}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    R.prepare_environment(tmp_path_factory.mktemp("cache"), hub=False)
    yield


def test_the_committed_index_is_the_installed_lm_evals():
    assert lm_eval.__version__ == T.LM_EVAL_VERSION
    committed = json.loads(gzip.decompress(T.INDEX_PATH.read_bytes()))
    built = T.build_index()
    assert built["version"] == committed["version"]
    for key in ("task_keys", "group_keys", "metrics", "aggregations", "filters"):
        assert built[key] == committed[key], key
    assert built["names"] == committed["names"], "the task index drifted: run `make lm-eval-index`"


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for p, data in files.items():
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(data)
    return root


def test_task_files_the_control_plane_accepts_load_in_lm_eval_with_the_counted_documents(tmp_path):
    facts = [json.loads(line) for line in (FOUNDATION / "facts.jsonl").read_text().splitlines()][:12]
    files = T.fact_task_files(facts) | {"gen/fact_gen.yaml": yaml.safe_dump(
        {**GEN, "dataset_kwargs": {"data_files": {"test": "fact_sentences.jsonl"}}}).encode()}
    checked = T.load_task_files(files, "t")
    root = _write(tmp_path / "tasks", files)
    tm = R.task_manager(root, standard=False)
    R.preload(sorted(checked.tasks), root, tm)
    from lm_eval.tasks import get_task_dict

    cwd = os.getcwd()
    os.chdir(root)  # data_files are relative to the task files' root, as the job runs them
    try:
        tasks = get_task_dict(sorted(checked.tasks), tm)
    finally:
        os.chdir(cwd)
    for name, task in tasks.items():
        assert len(list(task.eval_docs)) == checked.tasks[name].docs, name
        assert task.OUTPUT_TYPE in checked.tasks[name].output_types


def test_a_key_the_control_plane_refuses_is_refused_by_lm_eval_too(tmp_path):
    bad = {**GEN, "doc_to_txt": "{{context}}"}
    files = T.fact_task_files([{"id": "a", "answer": "Paris", "category": "c", "sentence": "It is Paris."},
                               {"id": "b", "answer": "Rome", "category": "c", "sentence": "It is Rome."}])
    files["bad.yaml"] = yaml.safe_dump(bad).encode()
    with pytest.raises(Exception, match="doc_to_txt"):
        T.load_task_files(files, "t")
    root = _write(tmp_path / "tasks", files)
    from lm_eval.tasks import get_task_dict

    with pytest.raises(Exception, match="doc_to_txt"):
        os.chdir(root)
        try:
            get_task_dict(["fact_gen"], R.task_manager(root, standard=False))
        finally:
            os.chdir(REPO)


def test_model_args_build_lm_evals_local_completions_model():
    from lm_eval.api.registry import get_model

    cls = get_model("local-completions")
    lm = cls(**R.model_args(base_url="http://127.0.0.1:9/v1", model="foundation", tokenizer=str(FOUNDATION),
                            max_length=512, seed=0, device="cpu"))
    assert lm.base_url == "http://127.0.0.1:9/v1/completions" and lm.tokenizer_backend == "huggingface"
    assert lm.max_length == 511 and lm.tok_encode("The capital of France is")  # the model's own tokenizer


def test_a_standard_task_on_an_offline_worker_fails_with_the_hub_message():
    with pytest.raises(FailedPrecondition, match="Hugging Face hub.*local task files"):
        R.preload(["arc_easy"], None, R.task_manager(None, standard=True))
