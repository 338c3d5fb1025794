"""The whole user path through the `tunery` CLI: the embedded stack, imports, artifacts, jobs, data, training,
and evaluation, on one shared embedded stack (tests/e2e/conftest.py: `cli_env`). The main job, `make demo`, has a
file of its own (tests/e2e/test_demo.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.e2e.conftest import E2E_BUCKET, TUNERY as TUNERY_BIN, tunery
from tests.servers import REPO

pytestmark = pytest.mark.e2e


def fixture(name: str) -> Path:
    return Path(os.environ.get("TUNERY_FIXTURES", REPO / "build" / "fixtures")) / name


def only(env, kind: str, name: str) -> dict:
    [art] = json.loads(tunery(env, "--json", "artifacts", "list", "--kind", kind, "--name", name).stdout)
    return art


def test_eval_run_with_local_lm_eval_tasks_then_report(cli_env, vllm_endpoint, tmp_path):
    """`tunery eval run --lm-eval-dir` sends a directory of lm-eval task files with the request; the report shows
    lm-eval's metric per task; a malformed task file is refused with its line, before anything runs. The target is
    the session's vLLM server, given by URL."""
    from services.evaluation.lm_eval_tasks import fact_task_files

    facts = [json.loads(line) for line in (REPO / "fixtures" / "foundation" / "facts.jsonl").read_text().splitlines()]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for p, data in fact_task_files(facts[:8]).items():
        (tasks / p).write_bytes(data)
    target = ["--endpoint", vllm_endpoint.base_url, "--endpoint-model", "foundation"]
    out = tunery(cli_env, "eval", "run", *target, "--lm-eval-dir", str(tasks), "--lm-eval-limit", "6", timeout=900)
    assert "lm-eval fact_sentences: acc" in out.stdout and "(6 documents)" in out.stdout, out.stdout
    report = out.stdout.split("report: ")[1].split()[0]
    shown = tunery(cli_env, "eval", "report", report, "--html", str(tmp_path / "r.html"))
    assert "fact_sentences" in shown.stdout and "general" in shown.stdout
    assert "lm-eval 0.4.13 tasks" in (tmp_path / "r.html").read_text()
    (tasks / "broken.yaml").write_text("task: broken\ndataset_path: [json\n")
    bad = tunery(cli_env, "eval", "run", *target, "--lm-eval-dir", str(tasks), check=False)
    said = " ".join(bad.stderr.split())  # the terminal wraps long lines
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in said and "broken.yaml: malformed YAML at line 3" in said, said


def test_up_import_inspect(cli_env, tmp_path):
    status = json.loads(tunery(cli_env, "--json", "status").stdout)
    assert set(status["health"].values()) == {"SERVING"} and len(status["health"]) == 8
    again = tunery(cli_env, "up")  # a second `up` finds the running stack and starts nothing
    assert "up" in again.stderr
    assert json.loads(tunery(cli_env, "--json", "status").stdout)["health"] == status["health"]
    tunery(cli_env, "models", "import", str(fixture("tiny-moe")), "--name", "tiny-moe", "--key", "moe-1")
    art = only(cli_env, "model", "tiny-moe")
    assert art["metadata"]["is_moe"] is True
    shown = json.loads(tunery(cli_env, "--json", "artifacts", "show", art["id"]).stdout)
    assert shown["ref"]["sha256"] == art["ref"]["sha256"]
    jobs = json.loads(tunery(cli_env, "--json", "jobs", "list").stdout)
    assert [(j["id"], j["state"]) for j in jobs if j["id"] == "moe-1"] == [("moe-1", "JOB_STATE_SUCCEEDED")]
    events = [json.loads(l) for l in tunery(cli_env, "--json", "jobs", "watch", "moe-1").stdout.splitlines()]
    assert events[-1]["state"] == "JOB_STATE_SUCCEEDED" and int(events[0]["cursor"]) == 1
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    tunery(cli_env, "datasets", "import", str(data), "--name", "tiny-data")
    assert only(cli_env, "dataset", "tiny-data")["metadata"]["stage"] == "raw"
    bad = tunery(cli_env, "models", "import", str(tmp_path / "missing"), "--name", "x", check=False)
    assert bad.returncode == 2 and "NOT_FOUND" in bad.stderr
    bad = tunery(cli_env, "models", "import", str(fixture("tiny-llama")), "--name", "../x", check=False)
    assert bad.returncode == 2 and "spec.name" in bad.stderr
    bad = tunery({**cli_env, "TUNERY_TOKEN": "wrong"}, "artifacts", "list", check=False)
    assert bad.returncode == 2 and "UNAUTHENTICATED" in bad.stderr


def test_imports_from_a_machine_that_shares_no_files_with_the_stack(cli_env, tmp_path):
    """The client runs in a mount namespace of its own with its files on a private tmpfs: the stack cannot see
    them (as from a laptop against a compose box). `tunery datasets import ./train.jsonl` and `tunery models import
    ./model` upload them; the same paths as server paths are refused."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.fail("needs unshare -m (util-linux, root): the test's client must not share the stack's files")
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    seed = tmp_path / "seed"
    shutil.copytree(fixture("tiny-llama"), seed / "model")
    (seed / "train.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                                              for i in range(8)))
    script = (f"mount -t tmpfs laptop {laptop} && cp -r {seed}/. {laptop}/ && rm -rf {seed} && cd {laptop} && "
              f"{TUNERY_BIN} datasets import ./train.jsonl --name from-laptop && "
              f"{TUNERY_BIN} models import ./model --name model-from-laptop && "
              f"{{ {TUNERY_BIN} datasets import ./train.jsonl --name no --server-path; echo server-path-rc=$?; }}")
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=cli_env,
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr
    assert not (laptop / "train.jsonl").exists()  # outside the client's namespace the files are not there
    assert "server-path-rc=2" in out.stdout and "PERMISSION_DENIED" in out.stderr and "import roots" in out.stderr
    data = only(cli_env, "dataset", "from-laptop")
    assert data["metadata"]["uploaded_from"] == f"{laptop}/train.jsonl"
    assert data["metadata"]["source"].startswith("upload://") and data["files"][0]["path"] == "train.jsonl"
    model = only(cli_env, "model", "model-from-laptop")
    assert model["metadata"]["architecture"] == "LlamaForCausalLM"
    assert sorted(f["path"] for f in model["files"]) == sorted(
        p.relative_to(fixture("tiny-llama")).as_posix() for p in fixture("tiny-llama").rglob("*") if p.is_file())


def test_the_stack_keeps_its_artifacts_in_s3(cli_env, s3):
    """The shared stack was started with `tunery up --store-url s3://... --s3-endpoint ...` (moto stands in for
    MinIO): an import lands in that bucket, manifest last."""
    from minio import Minio

    tunery(cli_env, "models", "import", str(fixture("tiny-llama")), "--name", "on-s3")
    art = only(cli_env, "model", "on-s3")
    m = Minio(s3.endpoint, access_key=cli_env["TUNERY_S3_ACCESS_KEY"], secret_key=cli_env["TUNERY_S3_SECRET_KEY"],
              secure=False)
    keys = [o.object_name for o in m.list_objects(E2E_BUCKET, prefix=f"projects/default/artifacts/{art['id']}/",
                                                  recursive=True)]
    assert keys == [f"projects/default/artifacts/{art['id']}/manifest.json"]
    blobs = {o.object_name for o in m.list_objects(E2E_BUCKET, prefix="projects/default/blobs/", recursive=True)}
    manifest = json.loads(tunery(cli_env, "--json", "artifacts", "show", art["id"]).stdout)
    assert all(f"projects/default/blobs/sha256/{f['sha256'][:2]}/{f['sha256']}" in blobs for f in manifest["files"])


def test_data_arc_generate_prepare_report(cli_env, vllm_endpoint):
    """Synthetic data from a teacher behind an OpenAI-compatible endpoint (the session's vLLM server), prepared
    with the base model's template, inspected, then trained on. (A teacher run inside the job: tests/integration/
    test_generate.py.)"""
    tunery(cli_env, "models", "import", str(fixture("tiny-llama")), "--name", "base")
    model = only(cli_env, "model", "base")
    recipe = REPO / "services" / "datagen" / "recipes" / "smoke.yaml"
    gen = json.loads(tunery(cli_env, "--json", "data", "generate", str(recipe), "--endpoint", vllm_endpoint.base_url,
                            "--endpoint-model", "foundation", "--name", "synth").stdout)
    assert gen["state"] == "JOB_STATE_SUCCEEDED"
    synthetic = gen["outputs"][-1]["uri"]
    prep = json.loads(tunery(cli_env, "--json", "data", "prepare", synthetic, "--base", model["id"],
                             "--holdout", "0.25").stdout)
    assert prep["state"] == "JOB_STATE_SUCCEEDED"
    prepared = prep["outputs"][-1]["uri"]
    report = json.loads(tunery(cli_env, "--json", "data", "report", prepared).stdout)
    assert int(report["num_train"]) + int(report["num_holdout"]) == 12 and int(report["num_holdout"]) == 3
    html = Path(report["html"])
    assert html.exists() and "data:image/png;base64," in html.read_text()
    lineage = json.loads(tunery(cli_env, "--json", "artifacts", "lineage", prepared).stdout)
    assert [a["name"] for a in lineage] == ["synth-prepared", "synth", "base"]
    # train: plan, then the smoke recipe with a progress bar, then the adapter's loss curve
    recipe = REPO / "services" / "training" / "recipes" / "smoke.yaml"
    plan = json.loads(tunery(cli_env, "--json", "train", "plan", str(recipe), "--base", model["id"],
                             "--dataset", prepared, "--set", "method=qlora").stdout)
    assert plan["feasible"] and plan["peak_gib_per_gpu"] > 0 and "q_proj" in plan["target_modules"]
    shown = tunery(cli_env, "train", "plan", str(recipe), "--base", model["id"], "--dataset", prepared).stdout
    assert "activations" in shown and "feasible" in shown
    trained = tunery(cli_env, "train", "submit", str(recipe), "--base", model["id"], "--dataset", prepared,
                     "--set", "lora.rank=4", "--key", "smoke-train")
    assert "loss=" in trained.stderr and "100%" in trained.stderr  # the progress bar
    adapter = trained.stdout.split("adapter: ", 1)[1].split()[0]
    png = tunery(cli_env, "artifacts", "download", adapter, "loss_curve.png", "--out",
                 str(Path(cli_env["TUNERY_HOME"]) / "loss.png")).stdout.strip()
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = json.loads(tunery(cli_env, "--json", "artifacts", "show", adapter).stdout)
    assert shown["metadata"]["rank"] == 4 and [p["uri"] for p in shown["parents"]] == [model["ref"]["uri"], prepared]
    bad = tunery(cli_env, "train", "submit", str(recipe), "--base", model["id"], "--dataset", synthetic, check=False)
    assert bad.returncode == 2 and "FAILED_PRECONDITION" in bad.stderr and "prepare" in bad.stderr
    # merge: a progress bar over the shards, the equivalence figures, a multi-shard model artifact
    merged = tunery(cli_env, "merge", model["id"], adapter, "--max-shard-size", "1MB")
    assert "100%" in merged.stderr and "greedy identical" in merged.stdout, merged.stdout + merged.stderr
    uri = merged.stdout.split("merged model: ", 1)[1].split()[0]
    shown = json.loads(tunery(cli_env, "--json", "artifacts", "show", uri).stdout)
    assert shown["metadata"]["form"] == "merged" and [p["uri"] for p in shown["parents"]] == [model["ref"]["uri"],
                                                                                               adapter]
    assert len([f for f in shown["files"] if f["path"].startswith("model-")]) >= 2  # 2.3 MB in 1 MB shards
    again = json.loads(tunery(cli_env, "--json", "merge", model["id"], adapter, "--max-shard-size", "1MB").stdout)
    assert again["state"] == "JOB_STATE_SUCCEEDED" and again["outputs"][-1]["uri"] == uri  # the same bytes again
    bad = tunery(cli_env, "merge", model["id"], adapter, "--max-shard-size", "lots", check=False)
    assert bad.returncode == 2 and "--max-shard-size 'lots'" in bad.stderr
