"""The real services of tests/test_containers.py: Postgres, an S3 server (moto[server]) and the
project's mlflow-server image run the way k8s/base/mlflow.yaml runs it.

The images and the engine come from `make test-containers` (containers/test.sh): DOCKER_HOST
points at the private dockerd, TLPIPE_IMAGE / TLPIPE_MLFLOW_IMAGE name the images it built.
containers/test.sh runs the tests, the dockerd and these services in a network namespace of
their own, in which S3 and MLflow answer on HOST (TLPIPE_TEST_HOST): an address that
containers on a bridge network (a TrainJob's nodes) reach too, where 127.0.0.1 would be their
own. Without it, HOST is 127.0.0.1 and only host-network containers reach the services.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s" / "base"
DOCKER = "/usr/bin/docker"  # Debian's client, matching dockerd 20.10
TLPIPE_IMAGE = os.environ.get("TLPIPE_IMAGE", "tlpipe:0.1.0-cpu")
MLFLOW_IMAGE = os.environ.get("TLPIPE_MLFLOW_IMAGE", "tlpipe-mlflow:0.1.0")
HOST = os.environ.get("TLPIPE_TEST_HOST", "127.0.0.1")

# The Secrets' values for this test (k8s/secrets/*.env.example's keys).
SECRETS = {
    "tlpipe-infra-secrets": {
        "POSTGRES_USER": "mlflow",
        "POSTGRES_PASSWORD": "pg-test-pw",
        "MLFLOW_ADMIN_USERNAME": "admin",
        "MLFLOW_ADMIN_PASSWORD": "admin-test-pw",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-test-secret",
    },
    "tlpipe-secrets": {
        "AWS_ACCESS_KEY_ID": "tlpipe-test",
        "AWS_SECRET_ACCESS_KEY": "tlpipe-test-secret",
        "MLFLOW_TRACKING_USERNAME": "tlpipe-pipeline",
        "MLFLOW_TRACKING_PASSWORD": "pipeline-test-pw",
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)[:300]} failed:\n{proc.stderr[-3000:]}")
    return proc


def wait_http(url: str, seconds: float = 120, proc_alive=lambda: True) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc_alive(), f"the server behind {url} exited"
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=3).close()
            return
        time.sleep(1)
    raise AssertionError(f"{url} did not answer in {seconds:.0f} s")


def manifest(name: str, kind: str, file: str) -> dict:
    docs = yaml.safe_load_all((K8S / file).read_text())
    return next(d for d in docs if d and d["kind"] == kind and d["metadata"]["name"] == name)


# ---------------------------------------------------------------------------- Postgres


@contextlib.contextmanager
def postgres() -> Iterator[int]:
    """A Postgres cluster of its own (Debian's server, run as user postgres); its port.

    Like k8s/base/postgres.yaml: database `mlflow`, owner POSTGRES_USER with a password.
    """
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    # user postgres cannot enter pytest's 0700 folders: a folder of its own under /tmp
    tmp = Path(tempfile.mkdtemp(prefix="tlpipe-pg-"))
    data, sock = tmp / "pgdata", tmp / "pgsock"
    for d in (data, sock):
        d.mkdir(parents=True)
        shutil.chown(d, "postgres", "postgres")
    shutil.chown(tmp, "postgres", "postgres")
    creds = SECRETS["tlpipe-infra-secrets"]
    pwfile = tmp / "pgpw"
    pwfile.write_text(creds["POSTGRES_PASSWORD"])
    shutil.chown(pwfile, "postgres", "postgres")

    def as_pg(*cmd: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True)

    port = free_port()
    as_pg(
        f"{bindir}/initdb",
        "-D",
        str(data),
        "-U",
        creds["POSTGRES_USER"],
        f"--pwfile={pwfile}",
        "--auth=scram-sha-256",
    )
    as_pg(
        f"{bindir}/pg_ctl",
        "-D",
        str(data),
        "-w",
        "-l",
        str(tmp / "pg.log"),
        "-o",
        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1",
        "start",
    )
    try:
        env = f"PGPASSWORD={creds['POSTGRES_PASSWORD']}"
        as_pg(
            "env",
            env,
            f"{bindir}/createdb",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            creds["POSTGRES_USER"],
            "mlflow",
        )
        yield port
    finally:
        as_pg(f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- S3


@contextlib.contextmanager
def s3_server(tmp: Path) -> Iterator[str]:
    """moto's S3-compatible server with buckets `mlflow` and `dvc` (k8s: MinIO); its URL."""
    import boto3

    port = free_port()
    exe = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "moto_server"
    if not exe.exists():
        exe = Path(shutil.which("moto_server") or "moto_server")
    log = (tmp / "moto.log").open("w")
    proc = subprocess.Popen([str(exe), "-H", HOST, "-p", str(port)], stdout=log, stderr=log)
    url = f"http://{HOST}:{port}"
    try:
        wait_http(url + "/moto-api/", 60, lambda: proc.poll() is None)
        keys = SECRETS["tlpipe-secrets"]
        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        for bucket in ("mlflow", "dvc"):
            s3.create_bucket(Bucket=bucket)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------------- MLflow server


def _container_env(container: dict, local: dict[str, str]) -> dict[str, str]:
    """The container's env as Kubernetes would set it: Secret/ConfigMap refs resolved from
    SECRETS and k8s/base/config.yaml, $(VAR) expanded; then cluster addresses → `local`."""
    config = manifest("tlpipe-config", "ConfigMap", "config.yaml")["data"]
    env: dict[str, str] = {}
    for item in container["env"]:
        ref = item.get("valueFrom", {})
        if "secretKeyRef" in ref:
            value = SECRETS[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            value = config[ref["configMapKeyRef"]["key"]]
        else:
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], item["value"])
        for cluster, here in local.items():
            value = value.replace(cluster, here)
        env[item["name"]] = value
    return env


def k8s_volume(folder: Path, pod: dict, name: str, files: dict[str, str]) -> Path:
    """Write Secret/ConfigMap volume `name` of `pod` into `folder` as the kubelet does: the
    files root-owned with the volume's `defaultMode` (0644 unless set), their group the pod's
    `fsGroup` when it has one (else root's), the folder root-owned 0755."""
    (volume,) = [v for v in pod["volumes"] if v["name"] == name]
    source = volume.get("secret") or volume.get("configMap")
    mode = source.get("defaultMode", 0o644)
    group = pod.get("securityContext", {}).get("fsGroup", 0)
    folder.mkdir(parents=True, exist_ok=True)
    for file, text in files.items():
        (folder / file).write_text(text)
        os.chown(folder / file, 0, group)
        (folder / file).chmod(mode)
    os.chown(folder, 0, group)
    folder.chmod(0o755)
    return folder


def pod_run_args(
    pod: dict, container: dict, env: dict[str, str], mounts: dict[str, Path], network="host"
) -> list:
    """`docker run` options for what the pod spec asks: user, fsGroup as a supplementary
    group, read-only root, tmpfs for its emptyDirs, read-only mounts for its Secret/ConfigMap
    volumes (folders made by `k8s_volume`); host network unless `network` names another."""
    pod_sc = pod["securityContext"]
    args = ["--network", network, "--user", f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}"]
    for group in [pod_sc.get("fsGroup"), *pod_sc.get("supplementalGroups", [])]:
        if group is not None:
            args += ["--group-add", str(group)]
    args += _restricted_args(container["securityContext"])
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            args += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]
        else:
            args += ["-v", f"{mounts[mount['name']]}:{mount['mountPath']}:ro"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    return args


def _restricted_args(sc: dict) -> list[str]:
    """`docker run` options for a container securityContext (what a test runs, it reads)."""
    args = []
    if sc.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for cap in sc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    return args


def auth_ini(pg_port: int) -> str:
    """k8s/secrets/basic_auth.ini.example with this test's Postgres."""
    ini = (ROOT / "k8s/secrets/basic_auth.ini.example").read_text()
    password = SECRETS["tlpipe-infra-secrets"]["POSTGRES_PASSWORD"]
    return ini.replace("mlflow:CHANGE_ME@postgres:5432", f"mlflow:{password}@127.0.0.1:{pg_port}")


@contextlib.contextmanager
def mlflow_server(tmp: Path, pg_port: int, s3_url: str) -> Iterator[str]:
    """The mlflow-server image run with k8s/base/mlflow.yaml's command, args, env, security
    context and volumes; only cluster addresses and the port are this machine's. Its URL."""
    deployment = manifest("mlflow", "Deployment", "mlflow.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = free_port()
    local = {
        "@postgres:5432/": f"@127.0.0.1:{pg_port}/",
        "http://minio.tlpipe.svc.cluster.local:9000": s3_url,
        # its own address, in the Host headers it accepts (MLFLOW_SERVER_ALLOWED_HOSTS)
        "mlflow.tlpipe.svc.cluster.local:5000": f"{HOST}:{port}",
    }
    env = _container_env(container, local)
    auth = k8s_volume(tmp / "mlflow-auth", pod, "auth", {"basic_auth.ini": auth_ini(pg_port)})
    args = [a if not a.startswith("--port=") else f"--port={port}" for a in container["args"]]
    name = f"tlpipe-mlflow-{port}"
    docker(
        "run",
        "-d",
        "--name",
        name,
        *pod_run_args(pod, container, env, {"auth": auth}),
        MLFLOW_IMAGE,
        *container["command"],
        *args,
    )
    url = f"http://{HOST}:{port}"  # the manifest's --host=0.0.0.0

    def alive() -> bool:
        state = docker("inspect", "-f", "{{.State.Running}}", name, check=False).stdout
        return state.strip() == "true"

    try:
        try:
            probe = container["startupProbe"]
            wait_http(url + probe["httpGet"]["path"], 300, alive)
        except AssertionError as e:
            logs = docker("logs", name, check=False)
            raise AssertionError(f"{e}\n{(logs.stdout + logs.stderr)[-4000:]}") from None
        yield url
    finally:
        (tmp / "mlflow.log").write_text(
            "".join(p for p in (lambda r: (r.stdout, r.stderr))(docker("logs", name, check=False)))
        )
        docker("rm", "-f", name, check=False)


def create_users(tmp: Path, url: str) -> str:
    """Job mlflow-users (k8s/base/mlflow-users.yaml) run as written, in the mlflow image, and
    retried as Kubernetes retries it: up to `backoffLimit` more times."""
    job = manifest("mlflow-users", "Job", "mlflow-users.yaml")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    files = manifest("mlflow-users", "ConfigMap", "mlflow-users.yaml")["data"]
    config = k8s_volume(tmp / "mlflow-users-config", pod, "config", files)
    env = _container_env(container, {"http://mlflow.tlpipe.svc.cluster.local:5000": url})
    args = [*pod_run_args(pod, container, env, {"config": config}), MLFLOW_IMAGE]
    failures = []
    for _ in range(1 + job["spec"]["backoffLimit"]):
        proc = docker("run", "--rm", *args, *container["command"], check=False)
        if proc.returncode == 0:
            return proc.stdout
        failures.append(proc.stderr.strip()[-500:])
    raise AssertionError("Job mlflow-users failed every try:\n" + "\n".join(failures))


# ---------------------------------------------------------------------------- compiled pods

POLICY = "pipeline-pods-policy.yaml"


def pipeline_pod(package: Path) -> dict:
    """What every step pod of the compiled pipeline `package` runs with, read from the spec
    (user, group, emptyDirs, env from Secret/ConfigMap/field) and from k8s/base's pipeline-pod
    policy (the container securityContext: read-only root, no privilege escalation, dropped
    capabilities). All executors must agree on user and scratch, or this fails."""
    docs = list(yaml.safe_load_all(package.read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(docs[0]["deploymentSpec"]["executors"]), "an executor lacks k8s"
    users = {json_key(e["securityContext"]) for e in executors.values()}
    assert len(users) == 1, f"executors disagree on user/group: {users}"
    scratch = {
        json_key([m for m in e.get("emptyDirMounts", []) if m["mountPath"] != "/dev/shm"])
        for e in executors.values()
    }
    assert len(scratch) == 1, f"executors disagree on scratch folders: {scratch}"
    any_executor = next(iter(executors.values()))
    shm = [
        m
        for e in executors.values()
        for m in e.get("emptyDirMounts", [])
        if m["mountPath"] == "/dev/shm"
    ]
    return {
        "securityContext": any_executor["securityContext"],
        "scratch": [
            m["mountPath"]
            for m in any_executor.get("emptyDirMounts", [])
            if m["mountPath"] != "/dev/shm"
        ],
        "shm_size": shm[0]["sizeLimit"].replace("Gi", "g") if shm else None,
        "secret_env": {
            (s["secretName"], k["secretKey"]): k["envVar"]
            for e in executors.values()
            for s in e.get("secretAsEnv", [])
            for k in s["keyToEnv"]
        },
        "config_env": {
            k["configMapKey"]: k["envVar"]
            for e in executors.values()
            for c in e.get("configMapAsEnv", [])
            for k in c["keyToEnv"]
        },
        "field_env": {f["name"] for e in executors.values() for f in e.get("fieldPathAsEnv", [])},
        "container": policy_security_context(),
    }


def json_key(value: object) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def policy_security_context() -> dict:
    """The container securityContext that k8s/base's MutatingAdmissionPolicy gives step pods
    (read from its CEL apply configuration)."""
    docs = yaml.safe_load_all((K8S / POLICY).read_text())
    policy = next(d for d in docs if d["kind"] == "MutatingAdmissionPolicy")
    text = " ".join(m["applyConfiguration"]["expression"] for m in policy["spec"]["mutations"])
    containers = text.split("containers:", 1)[1]
    sc: dict = {}
    for field in ("allowPrivilegeEscalation", "readOnlyRootFilesystem"):
        if found := re.search(rf"{field}:\s*(true|false)", containers):
            sc[field] = found[1] == "true"
    if found := re.search(r"drop:\s*\[([^\]]*)\]", containers):
        sc["capabilities"] = {"drop": re.findall(r'"(\w+)"', found[1])}
    return sc


def pipeline_docker_settings(pod: dict, env: dict[str, str]) -> dict:
    """kfp.local.DockerRunner / docker SDK settings for `pipeline_pod(...)`, with `env` the
    values of the variables the pod spec names (a variable it does not name is not passed)."""
    sc, container = pod["securityContext"], pod["container"]
    names = {*pod["secret_env"].values(), *pod["config_env"].values(), *pod["field_env"]}
    settings = {
        "user": f"{sc['runAsUser']}:{sc['runAsGroup']}",
        "read_only": bool(container.get("readOnlyRootFilesystem")),
        "tmpfs": {path: "rw,mode=1777" for path in pod["scratch"]},
        "cap_drop": container.get("capabilities", {}).get("drop", []),
        "environment": {k: v for k, v in env.items() if k in names},
    }
    if container.get("allowPrivilegeEscalation") is False:
        settings["security_opt"] = ["no-new-privileges"]
    if pod["shm_size"]:
        settings["shm_size"] = pod["shm_size"]
    return settings


def docker_run_args(settings: dict) -> list[str]:
    """The same settings as `docker run` options."""
    args = ["--user", settings["user"], *(["--read-only"] if settings["read_only"] else [])]
    for path, opts in settings["tmpfs"].items():
        args += ["--tmpfs", f"{path}:{opts}"]
    for cap in settings["cap_drop"]:
        args += ["--cap-drop", cap]
    for opt in settings.get("security_opt", []):
        args += ["--security-opt", opt]
    return args


# ---------------------------------------------------------------------------- kfp workaround


@contextlib.contextmanager
def kfp_reports_exit_status() -> Iterator[None]:
    """Make kfp.local.DockerRunner report a failed step as failed.

    kfp 2.17's `run_docker_container` starts each step with `auto_remove=True`, streams its
    logs, then asks for the exit status; when the engine has already removed the container it
    catches NotFound and returns 0, so a step that raised is reported SUCCESS (seen here on
    dockerd 20.10: fetch failed with a TlpipeError, kfp logged "finished with status
    SUCCESS"). Same run, but the container is kept until its status is read, then removed.
    """
    from kfp.local import docker_task_handler as handler

    def run(client, image, command, volumes, **run_args) -> int:
        image = handler.add_latest_tag_if_not_present(image=image)
        container = client.containers.run(
            image=image,
            command=command,
            detach=True,
            stdout=True,
            stderr=True,
            volumes=volumes,
            auto_remove=False,
            **run_args,
        )
        try:
            for line in container.logs(stream=True):
                print(line.decode(), end="")
            return container.wait()["StatusCode"]
        finally:
            container.remove(force=True)

    original = handler.run_docker_container
    handler.run_docker_container = run
    try:
        yield
    finally:
        handler.run_docker_container = original
