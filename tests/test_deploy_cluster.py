"""The GPU-cluster deployment files in deploy/: the Kubernetes work-pool template, the worker image and its lock,
the KubeRay cluster and the cluster deployments (docs/orchestration.md, "GPU clusters").

No Kubernetes, KubeRay, Docker daemon or GPU is available here, and prefect-kubernetes is not installed, so:
- the schema tests below read the files and check what a cluster would rely on (GPU requests, the weights cache,
  credentials only by Secret reference, one image everywhere, the lock against pyproject);
- the Prefect test checks what Prefect itself can check offline: the local server accepts the template for a
  `kubernetes` pool (it validates the template's placeholders against its variables; the pool type comes from
  the worker metadata bundled with Prefect), `prefect deploy` accepts the cluster deployments (flow parameters
  and job variables), and Prefect's own templating renders each deployment's Job manifest. What the
  prefect-kubernetes worker then does (submit the Job, prepend its own env to the container's env list) and
  whether Kubernetes admits the manifest are not tested here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
POOL_TEMPLATE = DEPLOY / "k8s" / "gpu-work-pool.json"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
LOCK = DEPLOY / "requirements.lock"
CLUSTER_DEPLOYMENTS = DEPLOY / "prefect-cluster.yaml"
POOL_NAME = "dp2o-gpu"
PLACEHOLDER = re.compile(r"{{\s*([\w.\-\[\]$]+)\s*}}")
#: env names that may only ever come from a Secret
CREDENTIAL = re.compile(r"^AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)$|SECRET|TOKEN|PASSWORD")


def _template() -> dict:
    return json.loads(POOL_TEMPLATE.read_text(encoding="utf-8"))


def _job_container(manifest: dict) -> dict:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _env_entries(doc) -> list[dict]:
    """Every Kubernetes env entry ({name, value | valueFrom}) anywhere in a document."""
    return [
        e
        for node in _walk(doc)
        if isinstance(node, dict) and isinstance(node.get("env"), list)
        for e in node["env"]
    ]


def _default(name: str):
    return _template()["variables"]["properties"][name]["default"]


def _cache_mount(container: dict, volumes: list[dict]) -> tuple[str, str]:
    """(mount path, claim name) of the read-only PVC volume mounted into `container`."""
    pvcs = {v["name"]: v["persistentVolumeClaim"] for v in volumes if "persistentVolumeClaim" in v}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] in pvcs]
    assert mount["readOnly"] is True and pvcs[mount["name"]]["readOnly"] is True, "weights are read-only"
    return mount["mountPath"], pvcs[mount["name"]]["claimName"]


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"not a plain name==version pin (no options, URLs or paths in the lock): {line!r}"
        pins[canonicalize_name(m[1])] = m[2]
    return pins


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# ---- the Kubernetes work-pool template ---------------------------------------------------------------------------


def test_pool_template_is_a_base_job_template():
    t = _template()
    assert set(t) == {"job_configuration", "variables"}
    jc, variables = t["job_configuration"], t["variables"]
    assert variables["type"] == "object"
    # what the Prefect server checks on `work-pool create`: every placeholder is a declared variable
    used = set(PLACEHOLDER.findall(json.dumps(jc)))
    assert used <= set(variables["properties"]), used - set(variables["properties"])
    manifest = jc["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    assert manifest["spec"]["backoffLimit"] == 0, (
        "a failed flow run is retried by Prefect, not by a second pod"
    )
    # the worker runs the flow run: with no `command` it fills in `prefect flow-run execute`
    assert _job_container(manifest)["args"] == "{{ command }}"


def test_pool_requests_gpus_through_a_variable():
    t = _template()
    limits = _job_container(t["job_configuration"]["job_manifest"])["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "{{ gpus }}"
    gpus = t["variables"]["properties"]["gpus"]
    assert (gpus["type"], gpus["default"], gpus["minimum"]) == ("integer", 1, 0)


def test_pool_mounts_the_weights_cache():
    t = _template()
    pod = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = _job_container(t["job_configuration"]["job_manifest"])
    path, claim = _cache_mount(container, pod["volumes"])
    assert claim == "{{ model_cache_claim }}" and _default("model_cache_claim")
    env = _env(container)
    for var in ("HF_HOME", "TORCH_HOME"):
        assert env[var]["value"].startswith(path.rstrip("/") + "/"), (var, env[var])
    assert env["HF_HUB_OFFLINE"]["value"] == "1", "weights come from the cache, never from a download"


def test_pool_takes_credentials_only_from_a_secret():
    t = _template()
    container = _job_container(t["job_configuration"]["job_manifest"])
    env = _env(container)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "{{ s3_secret_name }}" and not ref.get("optional"), name
    for e in _env_entries(t):
        if CREDENTIAL.search(e["name"]):
            assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
    # nothing that a job variable could carry a credential in by default, and no key-like strings at all
    assert "default" not in t["variables"]["properties"]["env"]
    text = POOL_TEMPLATE.read_text(encoding="utf-8")
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*=", text)


def test_pool_forwards_the_dp2o_logger():
    env = _env(_job_container(_template()["job_configuration"]["job_manifest"]))
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"]["value"] == "dp2o"


# ---- the KubeRay cluster -----------------------------------------------------------------------------------------


def test_raycluster_gpu_workers_match_the_pool():
    rc = yaml.safe_load(RAYCLUSTER.read_text(encoding="utf-8"))
    assert rc["kind"] == "RayCluster" and rc["apiVersion"].startswith("ray.io/")
    assert rc["spec"]["rayVersion"] == _lock()["ray"], "the cluster's Ray is the image's Ray"
    image = _default("image")
    containers = [c for node in _walk(rc) if isinstance(node, dict) for c in node.get("containers", [])]
    assert containers and {c["image"] for c in containers} == {image}, "one image everywhere"

    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    (head_container,) = head["template"]["spec"]["containers"]
    assert 10001 in {p["containerPort"] for p in head_container["ports"]}, "Ray Client (ray://) port"

    (group,) = rc["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # with no CPU limit, Ray would count the node's CPUs: the declared CPUs are the pod's request
    assert group["rayStartParams"]["num-cpus"] == worker["resources"]["requests"]["cpu"]
    path, claim = _cache_mount(worker, pod["volumes"])
    assert claim == _default("model_cache_claim")
    env = _env(worker)
    pool_env = _env(_job_container(_template()["job_configuration"]["job_manifest"]))
    for var in ("HF_HOME", "TORCH_HOME", "HF_HUB_OFFLINE"):
        assert env[var]["value"] == pool_env[var]["value"], var
    assert env["HF_HOME"]["value"].startswith(path.rstrip("/") + "/")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == _default("s3_secret_name")
    for e in _env_entries(rc):
        if CREDENTIAL.search(e["name"]):
            assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
    # the image has no dashboard extras: KubeRay's default HTTP probes would never pass, so ours are set
    for c in containers:
        assert "ray health-check" in " ".join(c["readinessProbe"]["exec"]["command"])


def test_model_cache_claim_and_fill_job_match_the_pool():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "model-cache.yaml").read_text(encoding="utf-8")))
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert pvc["metadata"]["name"] == _default("model_cache_claim")
    assert pvc["metadata"]["namespace"] == job["metadata"]["namespace"] == _default("namespace")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "read by many pods on many nodes"
    pod = job["spec"]["template"]["spec"]
    (fill,) = pod["containers"]
    assert fill["image"] == _default("image")
    env = _env(fill)
    pool_env = _env(_job_container(_template()["job_configuration"]["job_manifest"]))
    for var in ("HF_HOME", "TORCH_HOME"):
        assert env[var]["value"] == pool_env[var]["value"], var
    assert env["HF_HUB_OFFLINE"]["value"] == "0", "the one place that downloads"
    for e in _env_entries(job):
        if CREDENTIAL.search(e["name"]):
            assert "value" not in e and "secretKeyRef" in e["valueFrom"], e


@pytest.mark.s3
def test_s3_credentials_and_endpoint_from_the_environment_alone(monkeypatch):
    """What the pods get: AWS_* variables from the Secret, and a config with a bare s3:// root."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from dp2o.storage import Storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    # fsspec caches filesystems by their arguments, not by the environment: no instance from another test
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        host, port = server.get_host_and_port()
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }.items():
            monkeypatch.setenv(name, value)
        store = Storage("s3://dp2o-env-only/runs")
        store.fs.mkdir("dp2o-env-only")
        store.fs.pipe("dp2o-env-only/runs/probe.txt", b"ok")
        assert Storage("s3://dp2o-env-only/runs").fs.cat("dp2o-env-only/runs/probe.txt") == b"ok"
        assert store.storage_options == {}
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


# ---- the worker image and its lock -------------------------------------------------------------------------------


def test_dockerfile_installs_the_lock_then_dp2o_without_weights():
    steps = _dockerfile()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in steps if w == "ARG" and "=" in a}
    base = next(a for w, a in steps if w == "FROM")
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), base)
    assert "cuda" in base and "runtime" in base, base
    runs = [a for w, a in steps if w == "RUN"]
    lock_at = next(
        i for i, r in enumerate(runs) if re.search(r"pip install .*-r deploy/requirements\.lock", r)
    )
    self_at = next(i for i, r in enumerate(runs) if re.search(r"pip install .*--no-deps[^&]* \.(\s|$)", r))
    assert lock_at < self_at
    assert "--no-deps" in runs[lock_at] and "pip check" in runs[lock_at], "exactly the lock, checked"
    # no weights: nothing weight-like is copied in, nothing is downloaded at build time
    copied = [a for w, a in steps if w in ("COPY", "ADD")]
    assert not [w for w, a in steps if w == "ADD"], "COPY only (ADD can fetch URLs)"
    sources = [tok for a in copied for tok in a.split()[:-1] if not tok.startswith("--")]
    assert "deploy/requirements.lock" in sources
    weightish = re.compile(r"safetensors|\.bin$|\.pth?$|\.ckpt$|\.pt$|models?/?$|huggingface|\.cache|hub")
    assert not [s for s in sources if weightish.search(s)], sources
    assert "." not in sources, "an explicit list of sources, not the whole repository"
    downloads = re.compile(r"\bhf download|huggingface-cli|snapshot_download|prefetch|wget |curl ")
    assert not [r for r in runs if downloads.search(r)]
    # the image's cache locations are the pods'
    env_text = " ".join(a for w, a in steps if w == "ENV")
    pool_env = _env(_job_container(_template()["job_configuration"]["job_manifest"]))
    for var in ("HF_HOME", "TORCH_HOME"):
        assert f"{var}={pool_env[var]['value']}" in env_text, var


def test_lock_pins_every_runtime_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = _lock()
    required = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["ray"]]
    missing = [str(r) for r in required if canonicalize_name(r.name) not in pins]
    assert not missing, f"deploy/requirements.lock lacks {missing}: rerun deploy/lock.py"
    unsatisfied = [
        f"{r} (locked {pins[canonicalize_name(r.name)]})"
        for r in required
        if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)
    ]
    assert not unsatisfied, unsatisfied
    assert "grpcio" in pins, "Ray Client (ray://) needs ray[client]"
    assert not {"moto", "webdataset", "pytest-timeout"} & pins.keys(), "the dev extra stays out of the image"


# ---- the cluster deployments -------------------------------------------------------------------------------------


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_DEPLOYMENTS.read_text(encoding="utf-8"))


def test_cluster_deployments_mirror_the_generated_ones():
    generated = yaml.safe_load((DEPLOY / "prefect.yaml").read_text(encoding="utf-8"))["deployments"]
    cluster = _cluster()
    deployments = cluster["deployments"]
    stage_entrypoints = {d["entrypoint"] for d in generated if d["entrypoint"].startswith("flows/stages.py:")}
    assert stage_entrypoints == {
        d["entrypoint"] for d in deployments if d["entrypoint"].startswith("flows/stages")
    }
    names = [(d["entrypoint"], d["name"]) for d in deployments]
    assert len(set(names)) == len(names)
    (pull,) = cluster["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "."
    # entrypoints resolve inside the image's copy of the repository: the pod starts in the pool's app_dir,
    # which defaults to the folder the Dockerfile puts dp2o in
    steps = _dockerfile()
    assert ("WORKDIR", "${APP_DIR}") in steps
    app_dir = next(a.split("=", 1)[1] for w, a in steps if w == "ARG" and a.startswith("APP_DIR="))
    template = _template()
    assert template["variables"]["properties"]["app_dir"]["default"] == app_dir
    assert (
        template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0][
            "workingDir"
        ]
        == "{{ app_dir }}"
    )
    variables = set(template["variables"]["properties"])
    for d in deployments:
        assert d["work_pool"]["name"] == POOL_NAME
        assert set(d["work_pool"]["job_variables"]) <= variables, d["name"]
        params = d["parameters"]
        config = params.get("config", {})
        on_ray = params.get("executor", config.get("executor")) == "ray"
        assert (d["work_pool"]["job_variables"]["gpus"] == 0) == on_ray, "a Ray driver needs no GPU"
        if on_ray:
            address = params.get("ray", config.get("ray"))["address"]
            assert address == "{{ $DP2O_RAY_ADDRESS }}"
        root = params.get("root", config.get("root"))
        assert root == "{{ $DP2O_ROOT }}"
        assert "storage_options" not in params and "storage_options" not in config, "credentials stay out"
    demo = yaml.safe_load((REPO / "dp2o" / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    for d in deployments:
        if d["entrypoint"] == "flows/pipeline.py:pipeline":
            config = {
                k: v for k, v in d["parameters"]["config"].items() if k not in ("root", "executor", "ray")
            }
            assert config == {k: v for k, v in demo.items() if k != "root"}, "the demo config, as generated"


@pytest.mark.slow
def test_pool_and_cluster_deployments_are_accepted_by_prefect(prefect_harness):
    import asyncio
    import os
    import subprocess
    import sys
    from typing import Any

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.workers.base import BaseJobConfiguration

    root, address = "s3://test-bucket/dp2o-runs", "ray://dp2o-ray-head-svc:10001"
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "DP2O_ROOT": root,
        "DP2O_RAY_ADDRESS": address,
    }
    prefect = [sys.executable, "-m", "prefect"]

    def run(*args: str) -> None:
        r = subprocess.run([*prefect, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    run("work-pool", "create", POOL_NAME, "--type", "kubernetes", "--base-job-template", str(POOL_TEMPLATE),
        "--overwrite")  # fmt: skip
    run("--no-prompt", "deploy", "--all", "--prefect-file", str(CLUSTER_DEPLOYMENTS.relative_to(REPO)))

    class KubernetesJob(BaseJobConfiguration):
        """The fields of prefect-kubernetes' job configuration, to render the template with Prefect's own code."""

        namespace: str
        job_manifest: dict[str, Any]
        job_watch_timeout_seconds: int | None = None
        pod_watch_timeout_seconds: int
        stream_output: bool

    async def rendered() -> dict[str, KubernetesJob]:
        async with get_client() as client:
            pool = await client.read_work_pool(POOL_NAME)
            assert pool.type == "kubernetes"
            out = {}
            for name in (
                "dp2o-pipeline/cluster",
                "dp2o-pipeline/single-pod",
                "sample/cluster",
                "train/cluster",
            ):
                d = await client.read_deployment_by_name(name)
                assert d.work_pool_name == POOL_NAME
                params = d.parameters
                config = params.get("config", {})
                assert params.get("root", config.get("root")) == root, name
                if name != "dp2o-pipeline/single-pod":
                    assert params.get("ray", config.get("ray"))["address"] == address, name
                out[name] = await KubernetesJob.from_template_and_values(
                    pool.base_job_template, d.job_variables or {}, client=client
                )
            return out

    jobs = asyncio.run(rendered())
    for name, job in jobs.items():
        container = _job_container(job.job_manifest)
        assert container["image"] == _default("image")
        assert "args" not in container, "left to the worker: `prefect flow-run execute`"
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == (1 if name == "dp2o-pipeline/single-pod" else 0), (name, gpus)
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e
        }
        assert refs["AWS_SECRET_ACCESS_KEY"] == _default("s3_secret_name")
        assert job.namespace == job.job_manifest["metadata"]["namespace"] == _default("namespace")
        if gpus == 0:
            assert job.env["NVIDIA_VISIBLE_DEVICES"] == "void"
