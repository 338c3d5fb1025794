"""The whole user path through the `tunery` CLI: the embedded stack, imports, artifacts and jobs.

Today the pipeline is import -> manifest; later issues extend this file stage by stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import REPO, in_loopback_namespace

pytestmark = pytest.mark.e2e
TUNERY = str(Path(sys.executable).with_name("tunery"))


@pytest.fixture
def cli_env(tmp_path):
    if not in_loopback_namespace() and os.environ.get("TUNERY_NETNS") != "0":
        pytest.fail("e2e tests start a Ray head: run them through `make test` (loopback-only namespace)")
    env = {**os.environ, "TUNERY_HOME": str(tmp_path / "home")}
    for name in ("registry", "datagen", "training", "merging", "quantization", "evaluation", "serving", "pipeline"):
        env[f"TUNERY_{name.upper()}_PORT"] = "0"  # the services report the ports they got
    env.pop("TUNERY_TOKEN", None)
    yield env
    subprocess.run([TUNERY, "down"], env=env, capture_output=True, timeout=120)


def tunery(env, *args, check=True, timeout=300):
    out = subprocess.run([TUNERY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and out.returncode != 0:
        raise AssertionError(f"tunery {' '.join(args)} -> {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def fixture(name: str) -> Path:
    return Path(os.environ.get("TUNERY_FIXTURES", REPO / "build" / "fixtures")) / name


def test_demo_is_the_main_job(cli_env):
    """base -> data -> prompting-baseline eval -> train -> eval (base and adapter on one engine) -> compare, on the
    foundation fixture."""
    out = tunery(cli_env, "demo", "--model", str(REPO / "fixtures" / "foundation"), timeout=1800)
    result = json.loads(out.stdout)
    assert result["verdict"] in ("PASS", "FAIL") and result["flips_fail_to_pass"] > 0
    assert Path(result["comparison_html"]).read_text().count("side by side") == 1
    assert "target" in result["block_deltas"] and "general" in result["block_deltas"]
    [lm] = result["lm_eval_deltas"]  # forgetting measured by lm-eval too (plain sentences, log-likelihood)
    assert lm["task"] == "fact_sentences" and lm["ci"][0] <= lm["delta"] <= lm["ci"][1]
    # the prompting baseline ran before training, and its verdict is part of the comparison
    assert result["prompting_report"] and any("vs prompting baseline" in r for r in result["reasons"])
    assert set(result["eval_seconds"]) == {"prompted", "baseline", "candidate"}
    assert all(t["server_start_s"] > 0 and t["tests_s"] > 0 for t in result["eval_seconds"].values())
    assert "verdict:" in out.stderr
    assert not (Path(cli_env["TUNERY_HOME"]) / "stack.json").exists()  # the demo stopped what it started


def test_eval_run_with_local_lm_eval_tasks_then_report(cli_env, tmp_path):
    """`tunery eval run --lm-eval-dir` sends a directory of lm-eval task files with the request; the report shows
    lm-eval's metric per task; a malformed task file is refused with its line, before anything runs."""
    from services.evaluation.harness import fact_task_files

    facts = [json.loads(line) for line in (REPO / "fixtures" / "foundation" / "facts.jsonl").read_text().splitlines()]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for p, data in fact_task_files(facts[:8]).items():
        (tasks / p).write_bytes(data)
    tunery(cli_env, "up", "--num-cpus", "2")
    tunery(cli_env, "models", "import", str(REPO / "fixtures" / "foundation"), "--name", "foundation")
    [model] = json.loads(tunery(cli_env, "--json", "artifacts", "list", "--kind", "model").stdout)
    out = tunery(cli_env, "eval", "run", "--model", model["id"], "--lm-eval-dir", str(tasks), "--lm-eval-limit", "6",
                 timeout=900)
    assert "lm-eval fact_sentences: acc" in out.stdout and "(6 documents)" in out.stdout, out.stdout
    report = out.stdout.split("report: ")[1].split()[0]
    shown = tunery(cli_env, "eval", "report", report, "--html", str(tmp_path / "r.html"))
    assert "fact_sentences" in shown.stdout and "general" in shown.stdout
    assert "lm-eval 0.4.13 tasks" in (tmp_path / "r.html").read_text()
    (tasks / "broken.yaml").write_text("task: broken\ndataset_path: [json\n")
    bad = tunery(cli_env, "eval", "run", "--model", model["id"], "--lm-eval-dir", str(tasks), check=False)
    said = " ".join(bad.stderr.split())  # the terminal wraps long lines
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in said and "broken.yaml: malformed YAML at line 3" in said, said
    tunery(cli_env, "down")


def test_up_import_inspect_down(cli_env, tmp_path):
    tunery(cli_env, "up", "--num-cpus", "2")
    status = json.loads(tunery(cli_env, "--json", "status").stdout)
    assert set(status["health"].values()) == {"SERVING"} and len(status["health"]) == 8
    tunery(cli_env, "models", "import", str(fixture("tiny-moe")), "--name", "tiny-moe", "--key", "moe-1")
    arts = json.loads(tunery(cli_env, "--json", "artifacts", "list", "--kind", "model").stdout)
    assert [a["name"] for a in arts] == ["tiny-moe"] and arts[0]["metadata"]["is_moe"] is True
    shown = json.loads(tunery(cli_env, "--json", "artifacts", "show", arts[0]["id"]).stdout)
    assert shown["ref"]["sha256"] == arts[0]["ref"]["sha256"]
    jobs = json.loads(tunery(cli_env, "--json", "jobs", "list").stdout)
    assert [(j["id"], j["state"]) for j in jobs] == [("moe-1", "JOB_STATE_SUCCEEDED")]
    events = [json.loads(l) for l in tunery(cli_env, "--json", "jobs", "watch", "moe-1").stdout.splitlines()]
    assert events[-1]["state"] == "JOB_STATE_SUCCEEDED" and int(events[0]["cursor"]) == 1
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    tunery(cli_env, "datasets", "import", str(data), "--name", "tiny-data")
    bad = tunery(cli_env, "models", "import", str(tmp_path / "missing"), "--name", "x", check=False)
    assert bad.returncode == 2 and "NOT_FOUND" in bad.stderr
    bad = tunery(cli_env, "models", "import", str(fixture("tiny-llama")), "--name", "../x", check=False)
    assert bad.returncode == 2 and "spec.name" in bad.stderr
    bad = tunery({**cli_env, "TUNERY_TOKEN": "wrong"}, "artifacts", "list", check=False)
    assert bad.returncode == 2 and "UNAUTHENTICATED" in bad.stderr
    tunery(cli_env, "down")
    assert tunery(cli_env, "status", check=False).returncode == 1


def test_up_against_an_s3_server(cli_env):
    """`tunery up --store-url s3://... --s3-endpoint ...` switches the embedded stack to S3 (moto stands in for MinIO)."""
    from tests.servers import S3Server

    s3 = S3Server()
    try:
        env = {**cli_env, "TUNERY_S3_ACCESS_KEY": "e2e", "TUNERY_S3_SECRET_KEY": "e2e-secret"}
        tunery(env, "up", "--num-cpus", "2", "--store-url", "s3://tunery-e2e", "--s3-endpoint", s3.endpoint)
        tunery(env, "models", "import", str(fixture("tiny-llama")), "--name", "on-s3")
        arts = json.loads(tunery(env, "--json", "artifacts", "list").stdout)
        assert [a["name"] for a in arts] == ["on-s3"]
        from minio import Minio

        m = Minio(s3.endpoint, access_key="e2e", secret_key="e2e-secret", secure=False)
        keys = [o.object_name for o in m.list_objects("tunery-e2e", prefix="projects/default/artifacts/", recursive=True)]
        assert keys == [f"projects/default/artifacts/{arts[0]['id']}/manifest.json"]
        tunery(env, "down")
    finally:
        s3.stop()


def test_data_arc_generate_prepare_report(cli_env):
    """Synthetic data with the tiny teacher, prepared with the base model's template, then inspected."""
    tunery(cli_env, "up", "--num-cpus", "2")
    tunery(cli_env, "models", "import", str(fixture("tiny-llama")), "--name", "base")
    [model] = json.loads(tunery(cli_env, "--json", "artifacts", "list", "--kind", "model").stdout)
    recipe = REPO / "services" / "datagen" / "recipes" / "smoke.yaml"
    gen = json.loads(tunery(cli_env, "--json", "data", "generate", str(recipe), "--teacher", model["id"],
                            "--name", "synth").stdout)
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
    tunery(cli_env, "down")
