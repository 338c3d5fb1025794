"""Structural checks of the deployment files: k8s/ (kustomize), infra/compose.yaml, infra/docker/, infra/ray/.

No Docker engine or cluster is needed (none is used): only PyYAML and the standard library. When a
`kubectl` with kustomize is on PATH, the kustomizations are also rendered.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.core.server import LIVENESS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
BASE = K8S / "base"
INFRA = REPO / "infra"
COMPOSE = INFRA / "compose.yaml"
DOCKER = INFRA / "docker"
RAY_VERSION = "2.60.0"

SERVICES = {
    "registry": 50051,
    "datagen": 50052,
    "training": 50053,
    "merging": 50054,
    "quantization": 50055,
    "evaluation": 50056,
    "serving": 50057,
    "pipeline": 50058,
}
ROLES = ("train", "quantize", "serve")


def yaml_files() -> list[Path]:
    files = [p for root in (K8S, INFRA) for p in root.rglob("*") if p.suffix in (".yaml", ".yml")]
    return sorted(p for p in files if p.is_file())


def load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def kustomization(folder: Path) -> dict:
    return load_docs(folder / "kustomization.yaml")[0]


# ------------------------------------------------------------------ every YAML file


def test_yaml_files_exist():
    names = {p.relative_to(REPO).as_posix() for p in yaml_files()}
    for must in ("infra/compose.yaml", "infra/ray/cluster-aws.yaml", "k8s/base/kustomization.yaml",
                 "k8s/overlays/dev/kustomization.yaml", "k8s/overlays/gpu/kustomization.yaml"):
        assert must in names


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_yaml_parses(path: Path):
    docs = load_docs(path)
    assert docs, f"{path} has no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        if path.is_relative_to(K8S) and path.name != "kustomization.yaml":
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: object without apiVersion/kind"
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc.get('kind')} without a name"


# ------------------------------------------------------------------ kustomize


def test_base_kustomization_lists_exactly_the_files_in_base():
    listed = kustomization(BASE)["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    on_disk = {p.name for p in BASE.iterdir() if p.suffix in (".yaml", ".yml") and p.name != "kustomization.yaml"}
    assert set(listed) == on_disk, (
        f"in base but not listed: {sorted(on_disk - set(listed))}; listed but missing: {sorted(set(listed) - on_disk)}"
    )


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_overlays_point_at_existing_paths(overlay: str):
    folder = K8S / "overlays" / overlay
    k = kustomization(folder)
    assert k["resources"], f"{overlay}: no resources"
    for res in k["resources"]:
        assert (folder / res).exists(), f"{overlay}: {res} does not exist"
    for patch in k.get("patches", []):
        if "path" in patch:
            assert (folder / patch["path"]).exists(), f"{overlay}: patch {patch['path']} does not exist"
        else:
            assert isinstance(yaml.safe_load(patch["patch"]), (list, dict)), f"{overlay}: unparsable inline patch"


def test_every_k8s_object_is_part_of_tunery():
    for path in sorted(BASE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_docs(path):
            labels = doc["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/part-of") == "tunery", f"{path.name}: {doc['metadata']['name']}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl (with kustomize) on PATH")
@pytest.mark.parametrize("target", ["base", "overlays/dev", "overlays/gpu"])
def test_kustomize_renders(target: str):
    try:
        out = subprocess.run(["kubectl", "kustomize", str(K8S / target)], capture_output=True, text=True,
                             timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"kubectl kustomize unusable here: {e}")
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds.count("Deployment") == len(SERVICES)
    assert kinds.count("RayCluster") == 1
    assert all(d["metadata"].get("namespace") == "tunery" for d in docs if d["kind"] != "Namespace")


# ------------------------------------------------------------------ the eight services


def test_one_file_per_service():
    for name in SERVICES:
        files = [p for p in BASE.iterdir() if p.stem == name]
        assert [p.name for p in files] == [f"{name}.yaml"], f"{name}: {files}"
    # and no other file defines a service's Deployment
    for path in BASE.glob("*.yaml"):
        for dep in by_kind(load_docs(path), "Deployment"):
            assert dep["metadata"]["name"] == f"tunery-{path.stem}", f"{path.name} defines {dep['metadata']['name']}"


def _container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("name,port", sorted(SERVICES.items()))
def test_service_deployment(name: str, port: int):
    docs = load_docs(BASE / f"{name}.yaml")
    dep, svc = one(docs, "Deployment"), one(docs, "Service")
    assert dep["apiVersion"] == "apps/v1" and svc["apiVersion"] == "v1"
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == f"tunery-{name}"

    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == f"tunery-{name}"
    assert labels["app.kubernetes.io/part-of"] == "tunery"
    assert dep["metadata"]["labels"]["app.kubernetes.io/name"] == f"tunery-{name}"
    assert dep["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tunery"
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": f"tunery-{name}"}
    assert svc["spec"]["selector"].items() <= labels.items()

    c = _container(dep)
    assert c["command"] == ["python", "-m", f"services.{name}"]
    grpc_ports = [p for p in c["ports"] if p.get("name") == "grpc"]
    assert len(grpc_ports) == 1 and grpc_ports[0]["containerPort"] == port
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["port"] == port and svc_port["targetPort"] in ("grpc", port)
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env.get(f"TUNERY_{name.upper()}_PORT") == str(port)

    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == port, f"{probe} is not a gRPC probe on {port}"
    # readiness follows the overall status (Ray and the store answer); liveness only that the process does
    assert "service" not in c["readinessProbe"]["grpc"] and "service" not in c["startupProbe"]["grpc"]
    assert c["livenessProbe"]["grpc"]["service"] == LIVENESS

    res = c["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind]), f"{kind} needs cpu and memory"

    spec = pod["spec"]
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 10001
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    csc = c["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["readOnlyRootFilesystem"] is True
    assert "ALL" in csc["capabilities"]["drop"]

    # the server drains for 10 s on SIGTERM; the kubelet must wait longer than that
    assert spec["terminationGracePeriodSeconds"] > 10
    # service links would inject TUNERY_<SVC>_PORT=tcp://... and break the port settings
    assert spec["enableServiceLinks"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]]
    refs = {(k, v["name"]) for e in c["envFrom"] for k, v in e.items()}
    assert refs == {("configMapRef", "tunery-config"), ("secretRef", "tunery-secrets")}


# ------------------------------------------------------------------ config, MinIO, Ray


def _raycluster() -> dict:
    return one(load_docs(BASE / "raycluster.yaml"), "RayCluster")


def _start_resources(params: dict) -> dict:
    """rayStartParams.resources is a shell-quoted JSON object, e.g. '{"tunery_train": 1000}'."""
    raw = params["resources"]
    assert raw[0] == raw[-1] == "'", f"resources must be single-quoted for KubeRay's shell line: {raw!r}"
    return json.loads(raw[1:-1])


def test_config_points_at_the_right_services():
    docs = load_docs(BASE / "config.yaml")
    cm = one(docs, "ConfigMap")["data"]
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    assert set(secrets) == {"tunery-secrets", "tunery-minio-root"}
    assert {"TUNERY_AUTH_TOKENS", "TUNERY_S3_ACCESS_KEY", "TUNERY_S3_SECRET_KEY"} <= set(
        secrets["tunery-secrets"]["stringData"])
    for s in secrets.values():  # templates: nothing that looks like a real secret
        assert any("CHANGE-ME" in v for v in s["stringData"].values())
    for key in ("TUNERY_AUTH_TOKENS", "TUNERY_S3_ACCESS_KEY", "TUNERY_S3_SECRET_KEY"):
        assert key not in cm, f"{key} is a secret, not ConfigMap data"
    assert all(isinstance(v, str) for v in cm.values()), "ConfigMap values must be strings"
    assert cm["TUNERY_HOST"] == "0.0.0.0"
    assert cm["TUNERY_ROLE_RESOURCES"] == "true"
    for role in ("CONTROL", "TRAIN", "QUANTIZE", "SERVE"):
        assert cm[f"TUNERY_WORKER_PYTHON_{role}"] == "/opt/venv/bin/python"
    # KubeRay names the head Service <RayCluster>-head-svc
    assert cm["TUNERY_RAY_ADDRESS"] == f"http://{_raycluster()['metadata']['name']}-head-svc:8265"
    minio = [s for s in by_kind(load_docs(BASE / "minio.yaml"), "Service") if s["spec"].get("clusterIP") != "None"]
    host, port = cm["TUNERY_S3_ENDPOINT"].split(":")
    assert host == minio[0]["metadata"]["name"] and int(port) in [p["port"] for p in minio[0]["spec"]["ports"]]
    assert cm["TUNERY_STORE_URL"].startswith("s3://")


def test_minio():
    docs = load_docs(BASE / "minio.yaml")
    sts = one(docs, "StatefulSet")
    spec = sts["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    assert ":latest" not in c["image"] and "RELEASE." in c["image"], "pin MinIO"
    assert c["livenessProbe"]["httpGet"]["path"] == "/minio/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/minio/health/ready"
    assert sts["spec"]["volumeClaimTemplates"], "MinIO needs a PersistentVolumeClaim template"
    assert one(docs, "Job")["metadata"]["name"] == "tunery-minio-init"


def test_raycluster():
    rc = _raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert _start_resources(head["rayStartParams"]) == {"tunery_control": 1000}
    assert head["template"]["spec"]["containers"][0]["image"].startswith("tunery/control")

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(ROLES) <= set(groups)
    gpu_groups = 0
    for name, g in groups.items():
        role = name.removesuffix("-gpu")
        assert role in ROLES, name
        assert _start_resources(g["rayStartParams"]) == {f"tunery_{role}": 1000}
        assert g["minReplicas"] == 0 and g["replicas"] == 0, f"{name}: scale from zero"
        assert g["maxReplicas"] >= 0
        pod = g["template"]["spec"]
        (c,) = pod["containers"]
        limits = c["resources"]["limits"]
        if name.endswith("-gpu"):
            gpu_groups += 1
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert c["image"].startswith(f"tunery/worker-{role}-cuda")
        else:
            assert "nvidia.com/gpu" not in limits
            assert c["image"].startswith(f"tunery/worker-{role}:") or c["image"] == f"tunery/worker-{role}"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        refs = {(k, v["name"]) for e in c["envFrom"] for k, v in e.items()}
        assert refs == {("configMapRef", "tunery-config"), ("secretRef", "tunery-secrets")}, name
    assert gpu_groups >= 1


def test_ray_version_matches_the_control_plane_pin():
    control = (REPO / "requirements" / "control.txt")
    if not control.exists():
        pytest.skip("requirements/control.txt not present")
    pin = re.search(r"^ray(?:\[[^\]]*\])?==([\w.]+)", control.read_text(), re.M)
    assert pin, "requirements/control.txt does not pin ray"
    assert pin.group(1) == RAY_VERSION, "bump rayVersion, the Dockerfiles' assert and this test together"
    for dockerfile in ("Dockerfile.control", "Dockerfile.worker"):
        assert f"'{RAY_VERSION}'" in (DOCKER / dockerfile).read_text(), f"{dockerfile} does not assert Ray {RAY_VERSION}"


def test_ray_cluster_launcher_config():
    cfg = load_docs(INFRA / "ray" / "cluster-aws.yaml")[0]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert "tunery_control" in types[cfg["head_node_type"]]["resources"]
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all(t["min_workers"] == 0 for t in gpu), "GPU types must scale from zero"
    for name, t in types.items():
        if name == cfg["head_node_type"]:
            continue
        assert any(k.startswith("tunery_") for k in t["resources"]), f"{name} advertises no tunery_<role>"
        assert t["max_workers"] >= t["min_workers"] >= 0
    assert cfg["docker"]["image"] and cfg["docker"]["head_image"]


# ------------------------------------------------------------------ compose


def _compose() -> dict:
    return load_docs(COMPOSE)[0]


def test_compose_services_and_ports():
    services = _compose()["services"]
    for must in (*SERVICES, "minio", "minio-init", "ray-head"):
        assert must in services, f"compose has no {must}"
    for role in ROLES:
        assert f"ray-worker-{role}" in services
        gpu = services[f"ray-worker-{role}-gpu"]
        assert "gpu" in gpu["profiles"]
        (dev,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["count"] == 1
        assert gpu["build"]["args"] == {"ROLE": role, "DEVICE": "cuda"}
        assert services[f"ray-worker-{role}"]["build"]["args"] == {"ROLE": role, "DEVICE": "cpu"}
        assert "profiles" not in services[f"ray-worker-{role}"], "the CPU workers are the default"
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


@pytest.mark.parametrize("name,port", sorted(SERVICES.items()))
def test_compose_grpc_service(name: str, port: int):
    services = _compose()["services"]
    svc = services[name]
    assert svc["command"] == ["python", "-m", f"services.{name}"]
    assert svc["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert "Dockerfile.control" in svc["build"]["dockerfile"]
    env = svc["environment"]
    assert env["TUNERY_HOST"] == "0.0.0.0"
    assert env["TUNERY_RAY_ADDRESS"] == "http://ray-head:8265"
    assert env["TUNERY_S3_ENDPOINT"].split(":")[0] == "minio"
    assert not {"TUNERY_AUTH_TOKENS", "TUNERY_S3_SECRET_KEY"} & set(env), "secrets belong in the env file"
    assert svc["env_file"] == ["tunery.env"]
    assert svc["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert svc["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert str(port) in svc["healthcheck"]["test"]


def test_compose_env_example_has_every_secret():
    example = (INFRA / "tunery.env.example").read_text()
    keys = {line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")}
    assert {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "TUNERY_S3_ACCESS_KEY", "TUNERY_S3_SECRET_KEY",
            "TUNERY_AUTH_TOKENS"} <= keys


# ------------------------------------------------------------------ Dockerfiles


def _stages(dockerfile: Path) -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) grouped by FROM stage."""
    lines, buf = [], ""
    for raw in dockerfile.read_text().splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        buf += " " + s.rstrip("\\").strip() if buf else s.rstrip("\\").strip()
        if not s.endswith("\\"):
            lines.append(buf)
            buf = ""
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


@pytest.mark.parametrize("dockerfile", ["Dockerfile.control", "Dockerfile.worker"])
def test_dockerfile(dockerfile: str):
    path = DOCKER / dockerfile
    stages = _stages(path)
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    last = stages[-1]
    args = {}
    for line in last:
        m = re.match(r"ARG\s+(\w+)(?:=(\S*))?", line)
        if m:
            args[m.group(1)] = (m.group(2) or "").strip('"')
    users = [line.split(None, 1)[1] for line in last if line.upper().startswith("USER ")]
    assert users, "the runtime stage sets no USER"
    user = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), users[-1]).split(":")[0]
    assert user not in ("root", "0", ""), f"runtime runs as {users[-1]!r}"
    assert not user.startswith("$"), f"USER {users[-1]} has an ARG without a default"
    if user.isdigit():
        assert int(user) == 10001, "Kubernetes manifests run as 10001"
    assert any(line.startswith("COPY --from=builder /opt/venv /opt/venv") for line in last)
    # every path the build copies from the context exists, and the dockerignore lets it through
    ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for stage in stages:
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                srcs = [t for t in line.split()[1:] if not t.startswith("--")][:-1]
                for src in srcs:
                    assert (REPO / src).exists(), f"{dockerfile}: COPY {src} does not exist"
                    assert src.rstrip("/") in allowed, f"{dockerfile}: {src} is excluded by the dockerignore"


def test_control_dockerfile_defaults():
    text = (DOCKER / "Dockerfile.control").read_text()
    assert "TUNERY_HOST=0.0.0.0" in text
    assert re.search(r"^EXPOSE 50051-50058$", text, re.M)
    assert 'CMD ["python", "-m", "services.registry"]' in text
    assert "make protos" in text
    assert "requirements/control.txt" in text


def test_worker_dockerfile_roles():
    text = (DOCKER / "Dockerfile.worker").read_text()
    assert re.search(r"^ARG ROLE=train$", text, re.M) and re.search(r"^ARG DEVICE=cpu$", text, re.M)
    # the serve image drops the same packages as infra/scripts/setup-env.sh does for .venvs/serve
    setup_env = REPO / "infra" / "scripts" / "setup-env.sh"
    if setup_env.exists():
        m = re.search(r"serve\)\s*EXCLUDE=\(([^)]*)\)", setup_env.read_text())
        if m:
            excluded = m.group(1).split()
            dropped = re.search(r"pip uninstall -y ([\w\- ]+?)\s*\|\|", text)
            assert dropped and dropped.group(1).split() == excluded, "keep Dockerfile.worker in step with setup-env.sh"
    start = (DOCKER / "worker-start.sh").read_text()
    assert "--block" in start and 'tunery_$role' in start
    assert start.startswith("#!/bin/sh")
