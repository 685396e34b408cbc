"""The Kubeflow Trainer runtime (k8s/components/trainer) against the Trainer CRD's schema, and
its pod settings against the compiled pipeline's GPU task (no cluster needed).

tests/data/trainer.kubeflow.org_trainingruntimes.v1alpha1.schema.json is the openAPIV3Schema
of CRD trainingruntimes.trainer.kubeflow.org (v1alpha1) from kubeflow/trainer tag v2.3.0,
manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml (Apache-2.0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml
from test_k8s import render

from tlpipe.errors import TlpipeError
from tlpipe.kfp import trainjob

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).parent / "data/trainer.kubeflow.org_trainingruntimes.v1alpha1.schema.json"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    """The gpu overlay with the trainer component, as docs/kubeflow.md adds it."""
    work = tmp_path_factory.mktemp("trainer")
    image = {"name": "tlpipe", "newName": "registry.example.com/tlpipe/tlpipe", "newTag": "0.1.0"}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "tlpipe",  # as the overlays set it
        "resources": [os.path.relpath(ROOT / "k8s/overlays/gpu", work)],
        "components": [os.path.relpath(ROOT / "k8s/components/trainer", work)],
        "images": [image],
    }
    (work / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(work)


def _runtime(docs: list[dict]) -> dict:
    (runtime,) = [d for d in docs if d["kind"] == "TrainingRuntime"]
    return runtime


def _strict(schema: dict) -> dict:
    """The schema with unknown fields refused (Kubernetes would silently prune them)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def test_runtime_matches_the_trainer_crd_schema(rendered) -> None:
    runtime = _runtime(rendered)
    schema = _strict(json.loads(SCHEMA.read_text()))
    jsonschema.validate(runtime, schema)
    unknown = json.loads(json.dumps(runtime))
    unknown["spec"]["mlPolicy"]["torch"]["numProcPerNode"] = 1  # a TrainJob field in v2.3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(unknown, schema)
    assert runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert runtime["metadata"]["namespace"] == "tlpipe"
    broken = json.loads(json.dumps(runtime))
    broken["spec"]["mlPolicy"]["numNodes"] = "two"
    with pytest.raises(jsonschema.ValidationError):  # the schema does check
        jsonschema.validate(broken, schema)


def test_runtime_pods_get_the_single_pod_gpu_task_settings(rendered) -> None:
    """Node selector, toleration, /dev/shm, secrets, identity: as the compiled pretrain task."""
    pod = _runtime(rendered)["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]
    pod = pod["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    assert node["image"] == "registry.example.com/tlpipe/tlpipe:0.1.0"
    compiled = list(yaml.safe_load_all((ROOT / "src/tlpipe/kfp/transfer_learning.yaml").open()))
    executors = compiled[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for task in ("exec-pretrain", "exec-finetune"):
        want = executors[task]
        assert pod["nodeSelector"] == want["nodeSelector"]["labels"]
        assert pod["tolerations"] == want["tolerations"]
        for mount in want["emptyDirMounts"]:  # /dev/shm, and /tmp (the scratch)
            empty_dir = {k: mount[k] for k in ("medium", "sizeLimit") if k in mount}
            assert {"name": mount["volumeName"], "emptyDir": empty_dir} in pod["volumes"]
            volume_mount = {"name": mount["volumeName"], "mountPath": mount["mountPath"]}
            assert volume_mount in node["volumeMounts"]
        ctx = want["securityContext"]
        assert str(pod["securityContext"]["runAsUser"]) == ctx["runAsUser"]
        assert str(pod["securityContext"]["runAsGroup"]) == ctx["runAsGroup"]
        assert pod["securityContext"]["runAsNonRoot"] is ctx["runAsNonRoot"] is True
        env = {e["name"]: e["valueFrom"] for e in node["env"]}
        for secret in want["secretAsEnv"]:
            for key in secret["keyToEnv"]:
                ref = env[key["envVar"]]["secretKeyRef"]
                assert (ref["name"], ref["key"]) == (secret["secretName"], key["secretKey"])
    assert node["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert node["securityContext"]["allowPrivilegeEscalation"] is False


def test_pipeline_pods_may_submit_and_watch_trainjobs(rendered) -> None:
    (role,) = [
        d for d in rendered if d["kind"] == "Role" and d["metadata"]["name"].endswith("trainjobs")
    ]
    verbs = {r: set(rule["verbs"]) for rule in role["rules"] for r in rule["resources"]}
    assert {"create", "get", "delete"} <= verbs["trainjobs"]
    assert "get" in verbs["trainingruntimes"] and "get" in verbs["pods/log"]
    bindings = [d for d in rendered if d["kind"] == "RoleBinding"]
    (binding,) = [d for d in bindings if d["roleRef"]["name"] == role["metadata"]["name"]]
    base = [d for d in bindings if d is not binding]
    assert binding["subjects"] == base[0]["subjects"]  # the same pipeline identities


def test_the_container_backend_passes_what_the_runtime_takes_from_the_cluster(rendered) -> None:
    """No Secrets in the SDK's container backend: the nodes get the task's own values of exactly
    the variables that the runtime's pods take from Secret / ConfigMap on a cluster."""
    pod = _runtime(rendered)["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]
    (node,) = pod["spec"]["template"]["spec"]["containers"]
    assert {e["name"] for e in node["env"] if "valueFrom" in e} == set(trainjob.SECRET_ENV)


def test_the_container_backend_needs_the_runtime_file(monkeypatch) -> None:
    monkeypatch.setenv(trainjob.BACKEND_ENV, "container")
    monkeypatch.delenv(trainjob.RUNTIMES_ENV, raising=False)
    with pytest.raises(TlpipeError, match=trainjob.RUNTIMES_ENV):
        trainjob.client()


def test_a_failed_jobs_reason_is_its_first_exception_then_its_events() -> None:
    """`trainjob._reason` on what the SDK's clients return: the container backend's logs come
    as one chunk per node and it has no events; Kubernetes' come as lines, with events."""
    from types import SimpleNamespace

    node0 = (  # a chained exception (raised from another), then a second traceback
        'Waiting\nTraceback (most recent call last):\n  File "x.py"\nOSError: short\n\n'
        "The above exception was the direct cause of the following exception:\n\n"
        'Traceback (most recent call last):\n  File "y.py"\nValueError: bad data\n'
        'Traceback (most recent call last):\n  File "z.py"\nRuntimeError: gloo: peer gone\n'
    )
    node1 = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n  exitcode: 1\n"

    class Client:
        def __init__(self, logs, events=None):
            self.logs, self.events = logs, events

        def get_job_logs(self, name):
            return iter(self.logs)

        def get_job_events(self, name):
            if self.events is None:
                raise NotImplementedError
            return self.events

    assert trainjob._reason(Client([node0, node1]), "j") == "ValueError: bad data"
    pulled = SimpleNamespace(involved_object_name="p", reason="Pulled", message="ok")
    backoff = SimpleNamespace(involved_object_name="j-node-0", reason="Failed", message="exit 1")
    got = trainjob._reason(Client(node0.splitlines(keepends=True), [pulled, backoff]), "j")
    assert got == "ValueError: bad data; j-node-0: Failed: exit 1"
    assert trainjob._reason(Client(["a\n", "b\n"]), "j") == "a | b"
    assert trainjob._reason(Client([]), "j") == "no events and an empty log"


def test_runtime_pods_are_restricted(rendered) -> None:
    """The TrainJob's pods run where the pipeline's pods run: Pod Security `restricted`."""
    from test_k8s import restricted_problems

    pod = _runtime(rendered)["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]
    assert restricted_problems("runtime tlpipe", pod["spec"]["template"]["spec"]) == []
