"""The KubeRay manifests of infra/kuberay/ are objects the API server accepts, and they fit together and with the code.

The schema below is a strict subset of the real ones: KubeRay v1.3.2's CRDs (ray.io/v1, as generated into
ray-operator/config/crd/bases/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml from apis/ray/v1/raycluster_types.go
and rayjob_types.go) and the Kubernetes core/v1 objects they embed (PodTemplateSpec, PodSpec, Container, Volume,
EnvFromSource, ResourceRequirements, ConfigMap, Secret). Field names, types, enums, what is required and the
resource quantity pattern are copied from those sources; only the fields the manifests use (and a few close
neighbours) are listed, and every object level forbids unknown fields (`additionalProperties: false`), so a typo or
a field of another release fails here instead of being pruned silently by the API server. Every field used exists
unchanged since KubeRay v1.2.0 (backoffLimit is the newest: "Support retry in RayJob", v1.2.0; submissionMode and
activeDeadlineSeconds came in v1.1.0): the manifests need an operator >= 1.2.
Two rules are the project's, stricter than Kubernetes: resource quantities must be strings (the API also takes
bare numbers) and images must be the project's documented tags.
"""
from __future__ import annotations

import copy
import pathlib
import shlex

import jsonschema
import pytest
import yaml

from tests.infra_helpers import DOCKERFILES, REPO, documented_tag, lock_pins, pyproject

KUBERAY = REPO / "infra" / "kuberay"
MANIFESTS = ("configmap.yaml", "secret.example.yaml", "raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml")
KUBERAY_RELEASE = "v1.3.2"

# -- the schema ----------------------------------------------------------------------------------------------------
# k8s.io/apimachinery/pkg/api/resource.Quantity, as the CRDs spell it
QUANTITY_PATTERN = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)"
                    r"|(\.[0-9]+))))?$")
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
STR, BOOL = {"type": "string"}, {"type": "boolean"}
INT32 = {"type": "integer", "minimum": -2 ** 31, "maximum": 2 ** 31 - 1}
NON_NEGATIVE_INT32 = {**INT32, "minimum": 0}
STR_MAP = {"type": "object", "additionalProperties": STR}
STR_LIST = {"type": "array", "items": STR}


def obj(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def ref(name: str) -> dict:
    return {"$ref": f"#/$defs/{name}"}


def array(name: str, **kw) -> dict:
    return {"type": "array", "items": ref(name), **kw}


DEFS = {
    # core/v1 and meta/v1
    "Quantity": {"type": "string", "pattern": QUANTITY_PATTERN},
    "ResourceList": {"type": "object", "propertyNames": {"pattern": r"^([a-z0-9.-]+/)?[a-z0-9A-Z._-]+$"},
                     "additionalProperties": ref("Quantity")},
    "ResourceRequirements": obj({"limits": ref("ResourceList"), "requests": ref("ResourceList")}),
    "ObjectMeta": obj({"name": {"type": "string", "pattern": DNS1123_SUBDOMAIN, "maxLength": 253},
                       "namespace": {"type": "string", "pattern": DNS1123_LABEL}, "labels": STR_MAP,
                       "annotations": STR_MAP}, ("name",)),
    "TemplateMeta": obj({"labels": STR_MAP, "annotations": STR_MAP}),
    "LocalObjectReference": obj({"name": STR, "optional": BOOL}, ("name",)),
    "EnvFromSource": {**obj({"configMapRef": ref("LocalObjectReference"), "secretRef": ref("LocalObjectReference"),
                             "prefix": STR}), "minProperties": 1},
    "KeySelector": obj({"name": STR, "key": STR, "optional": BOOL}, ("key",)),
    "EnvVar": obj({"name": STR, "value": STR,
                   "valueFrom": obj({"configMapKeyRef": ref("KeySelector"), "secretKeyRef": ref("KeySelector"),
                                     "fieldRef": obj({"apiVersion": STR, "fieldPath": STR}, ("fieldPath",))})},
                  ("name",)),
    "VolumeMount": obj({"name": STR, "mountPath": STR, "readOnly": BOOL, "subPath": STR}, ("name", "mountPath")),
    "ContainerPort": obj({"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 15},
                          "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                          "protocol": {"enum": ["TCP", "UDP", "SCTP"]}}, ("containerPort",)),
    "LifecycleHandler": obj({"exec": obj({"command": STR_LIST})}),
    "Lifecycle": obj({"postStart": ref("LifecycleHandler"), "preStop": ref("LifecycleHandler")}),
    "SecurityContext": obj({"allowPrivilegeEscalation": BOOL, "runAsNonRoot": BOOL, "runAsUser": INT32,
                            "runAsGroup": INT32, "readOnlyRootFilesystem": BOOL, "privileged": BOOL,
                            "capabilities": obj({"add": STR_LIST, "drop": STR_LIST})}),
    "Container": obj({"name": {"type": "string", "pattern": DNS1123_LABEL}, "image": STR,
                      "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                      "command": STR_LIST, "args": STR_LIST, "workingDir": STR,
                      "ports": array("ContainerPort"), "env": array("EnvVar"), "envFrom": array("EnvFromSource"),
                      "resources": ref("ResourceRequirements"), "volumeMounts": array("VolumeMount"),
                      "lifecycle": ref("Lifecycle"), "securityContext": ref("SecurityContext")},
                     ("name", "image")),
    "EmptyDirVolumeSource": obj({"medium": {"enum": ["", "Memory"]}, "sizeLimit": ref("Quantity")}),
    "Volume": obj({"name": {"type": "string", "pattern": DNS1123_LABEL}, "emptyDir": ref("EmptyDirVolumeSource")},
                  ("name",)),
    "Toleration": obj({"key": STR, "operator": {"enum": ["Exists", "Equal"]}, "value": STR,
                       "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                       "tolerationSeconds": {"type": "integer"}}),
    "PodSecurityContext": obj({"runAsNonRoot": BOOL, "runAsUser": INT32, "runAsGroup": INT32, "fsGroup": INT32}),
    "PodSpec": obj({"containers": array("Container", minItems=1), "initContainers": array("Container"),
                    "volumes": array("Volume"), "securityContext": ref("PodSecurityContext"),
                    "tolerations": array("Toleration"), "nodeSelector": STR_MAP, "serviceAccountName": STR,
                    "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
                    "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]}}, ("containers",)),
    "PodTemplateSpec": obj({"metadata": ref("TemplateMeta"), "spec": ref("PodSpec")}),
    "ConfigMap": obj({"apiVersion": {"const": "v1"}, "kind": {"const": "ConfigMap"}, "metadata": ref("ObjectMeta"),
                      "data": {"type": "object", "propertyNames": {"pattern": r"^[-._a-zA-Z0-9]+$"},
                               "additionalProperties": STR},
                      "immutable": BOOL}, ("apiVersion", "kind", "metadata")),
    "Secret": obj({"apiVersion": {"const": "v1"}, "kind": {"const": "Secret"}, "metadata": ref("ObjectMeta"),
                   "type": STR,
                   "stringData": {"type": "object", "propertyNames": {"pattern": r"^[-._a-zA-Z0-9]+$"},
                                  "additionalProperties": STR},
                   "data": {"type": "object", "additionalProperties": {"type": "string",
                                                                       "contentEncoding": "base64"}},
                   "immutable": BOOL}, ("apiVersion", "kind", "metadata")),
    # ray.io/v1 (raycluster_types.go, rayjob_types.go)
    "RayStartParams": {"type": "object", "additionalProperties": STR},  # map[string]string: "0", not 0
    "AutoscalerOptions": obj({"resources": ref("ResourceRequirements"), "image": STR,
                              "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                              "env": array("EnvVar"), "envFrom": array("EnvFromSource"),
                              "volumeMounts": array("VolumeMount"), "securityContext": ref("SecurityContext"),
                              "idleTimeoutSeconds": INT32,
                              "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}}),
    "HeadGroupSpec": obj({"serviceType": STR, "enableIngress": BOOL, "rayStartParams": ref("RayStartParams"),
                          "template": ref("PodTemplateSpec")}, ("rayStartParams", "template")),
    "WorkerGroupSpec": obj({"groupName": STR, "replicas": NON_NEGATIVE_INT32, "minReplicas": NON_NEGATIVE_INT32,
                            "maxReplicas": NON_NEGATIVE_INT32, "numOfHosts": {**INT32, "minimum": 1},
                            "rayStartParams": ref("RayStartParams"), "template": ref("PodTemplateSpec"),
                            "scaleStrategy": obj({"workersToDelete": STR_LIST})},
                           ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template")),
    "RayClusterSpec": obj({"headGroupSpec": ref("HeadGroupSpec"), "workerGroupSpecs": array("WorkerGroupSpec"),
                           "rayVersion": STR, "enableInTreeAutoscaling": BOOL,
                           "autoscalerOptions": ref("AutoscalerOptions"), "headServiceAnnotations": STR_MAP,
                           "suspend": BOOL}, ("headGroupSpec",)),
    "RayCluster": obj({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"},
                       "metadata": ref("ObjectMeta"), "spec": ref("RayClusterSpec")},
                      ("apiVersion", "kind", "metadata", "spec")),
    "RayJobSpec": obj({"activeDeadlineSeconds": {**INT32, "minimum": 1}, "backoffLimit": NON_NEGATIVE_INT32,
                       "rayClusterSpec": ref("RayClusterSpec"), "submitterPodTemplate": ref("PodTemplateSpec"),
                       "metadata": STR_MAP, "clusterSelector": STR_MAP,
                       "submitterConfig": obj({"backoffLimit": NON_NEGATIVE_INT32}),
                       "entrypoint": STR, "runtimeEnvYAML": STR, "jobId": STR,
                       "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                       "entrypointResources": STR, "entrypointNumCpus": {"type": "number"},
                       "entrypointNumGpus": {"type": "number"}, "ttlSecondsAfterFinished": NON_NEGATIVE_INT32,
                       "shutdownAfterJobFinishes": BOOL, "suspend": BOOL}),
    "RayJob": obj({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": ref("ObjectMeta"),
                   "spec": ref("RayJobSpec")}, ("apiVersion", "kind", "metadata", "spec")),
}


def validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$defs": DEFS, "$ref": f"#/$defs/{kind}"}
    return jsonschema.Draft202012Validator(schema)


def errors(doc: dict) -> list[str]:
    kind = doc.get("kind")
    if kind not in ("RayCluster", "RayJob", "ConfigMap", "Secret"):
        return [f"unexpected kind {kind!r}"]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(kind).iter_errors(doc)]


# -- the manifests -------------------------------------------------------------------------------------------------
def load() -> dict[str, dict]:
    docs = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        docs[path.name] = doc
    return docs


DOCS = load()


def by_kind(kind: str) -> dict[str, dict]:
    return {name: d for name, d in DOCS.items() if d["kind"] == kind}


def cluster_specs() -> dict[str, dict]:
    specs = {name: d["spec"] for name, d in by_kind("RayCluster").items()}
    specs.update({name: d["spec"]["rayClusterSpec"] for name, d in by_kind("RayJob").items()})
    return specs


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    """(group, pod template) of the head and of every worker group."""
    return [("head", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]


def ray_containers():
    for name, spec in cluster_specs().items():
        for group, template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                yield name, group, template["spec"], container


def test_the_expected_manifests_and_nothing_else():
    assert sorted(DOCS) == sorted(MANIFESTS)
    assert {d["kind"] for d in DOCS.values()} == {"ConfigMap", "Secret", "RayCluster", "RayJob"}


def test_schema_is_a_valid_draft_2020_12_schema():
    for kind in ("RayCluster", "RayJob", "ConfigMap", "Secret"):
        jsonschema.Draft202012Validator.check_schema(validator(kind).schema)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_the_kuberay_and_core_schema(name):
    assert errors(DOCS[name]) == []


def _set(doc: dict, path: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


HEAD = "spec.rayClusterSpec.headGroupSpec"
WORKER = "spec.rayClusterSpec.workerGroupSpecs.0"
REJECTED = [  # (manifest, path, value, what the schema must say)
    ("rayjob-train.yaml", "spec.shutdownAfterJobFinish", True, "Additional properties"),  # a typo
    ("rayjob-train.yaml", "spec.ttlSecondsAfterFinish", 600, "Additional properties"),
    ("rayjob-train.yaml", "spec.rayClusterSpec.enableInTreeAutoscaler", True, "Additional properties"),
    ("rayjob-train.yaml", f"{HEAD}.template.spec.containers.0.imagePullPolcy", "Always", "Additional properties"),
    ("rayjob-train.yaml", f"{HEAD}.template.spec.volumes.0.emptyDir.sizelimit", "1Gi", "Additional properties"),
    ("rayjob-train.yaml", f"{WORKER}.maxReplica", 8, "Additional properties"),
    ("rayjob-train.yaml", f"{WORKER}.template.spec.containers.0.resources.limit", {}, "Additional properties"),
    ("rayjob-train.yaml", f"{WORKER}.template.spec.containers.0.envFrom.1.secretRef.key", "x", "Additional"),
    ("rayjob-train.yaml", "spec.submissionMode", "K8sJob", "is not one of"),
    ("rayjob-train.yaml", "spec.backoffLimit", -1, "less than the minimum"),
    ("rayjob-train.yaml", "spec.activeDeadlineSeconds", "1d", "is not of type"),
    ("rayjob-train.yaml", f"{HEAD}.rayStartParams.num-cpus", 0, "is not of type 'string'"),
    ("rayjob-train.yaml", f"{WORKER}.template.spec.containers.0.resources.limits.memory", "32 GB", "does not match"),
    ("rayjob-train.yaml", f"{WORKER}.template.spec.containers.0.resources.limits.cpu", 8, "is not of type"),
    ("rayjob-train.yaml", f"{HEAD}.template.spec.volumes.0.emptyDir.medium", "memory", "is not one of"),
    ("rayjob-tune.yaml", "apiVersion", "ray.io/v1alpha1", "was expected"),
    ("raycluster.yaml", "spec.workerGroupSpecs.0.minReplicas", None, "is not of type"),
    ("raycluster.yaml", "spec.headGroupSpec.template.spec.containers.0.ports.0.containerPort", 70000, "maximum"),
    ("raycluster.yaml", "metadata.name", "KPP_cluster", "does not match"),
    ("configmap.yaml", "data.RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 1.0, "is not of type 'string'"),
    ("configmap.yaml", "dta", {}, "Additional properties"),
    ("secret.example.yaml", "stringdata", {}, "Additional properties"),
]


@pytest.mark.parametrize("name,path,value,expect", REJECTED, ids=[f"{r[0]}:{r[1]}" for r in REJECTED])
def test_schema_rejects_an_unknown_or_wrong_field(name, path, value, expect):
    assert errors(DOCS[name]) == []
    found = errors(_set(DOCS[name], path, value))
    assert any(expect in e for e in found), found


def test_schema_rejects_a_missing_required_field():
    job = copy.deepcopy(DOCS["rayjob-train.yaml"])
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in e for e in errors(job))
    del job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert any("'rayStartParams' is a required property" in e for e in errors(job))


# -- cross-references ----------------------------------------------------------------------------------------------
def test_every_env_from_names_an_object_defined_here():
    defined = {("configMapRef", d["metadata"]["name"]) for d in by_kind("ConfigMap").values()}
    defined |= {("secretRef", d["metadata"]["name"]) for d in by_kind("Secret").values()}
    seen = 0
    for name, group, _, c in ray_containers():
        refs = {(k, v["name"]) for src in c.get("envFrom", []) for k, v in src.items() if k.endswith("Ref")}
        assert refs <= defined, (name, group, refs - defined)
        # S3 and MLflow settings and credentials reach every Ray container
        assert {k for k, _ in refs} == {"configMapRef", "secretRef"}, (name, group)
        seen += 1
    assert seen >= 6


def test_every_ray_container_mounts_a_memory_backed_dev_shm():
    for name, group, pod, c in ray_containers():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert set(mounts.values()) <= set(volumes), (name, group, "a mount of an undefined volume")
        assert "/dev/shm" in mounts, (name, group, c["name"])
        shm = volumes[mounts["/dev/shm"]]
        assert shm.get("emptyDir", {}).get("medium") == "Memory", (name, group)
        assert "sizeLimit" in shm["emptyDir"], (name, group, "an unbounded tmpfs counts against node memory")


def test_head_serves_the_dashboard_and_trains_nothing():
    for name, spec in cluster_specs().items():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", name
        assert head["rayStartParams"]["num-cpus"] == "0", name
        assert head["rayStartParams"].get("include-dashboard", "true") != "false", name
        (c,) = head["template"]["spec"]["containers"]
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["dashboard"] == 8265, name
        assert not any("gpu" in r for r in c["resources"].get("limits", {})), (name, "a GPU on the head")


def test_gpu_workers_autoscale_between_bounds():
    for name, spec in cluster_specs().items():
        assert spec["enableInTreeAutoscaling"] is True, name
        groups = spec["workerGroupSpecs"]
        assert groups, name
        for g in groups:
            assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] >= 1, \
                (name, g["groupName"])
            (c,) = g["template"]["spec"]["containers"]
            limits, requests = c["resources"]["limits"], c["resources"].get("requests", {})
            assert int(limits["nvidia.com/gpu"]) >= 1, (name, g["groupName"])
            # an extended resource's request must equal its limit
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"], name
            assert any(t.get("key") == "nvidia.com/gpu" for t in g["template"]["spec"].get("tolerations", [])), name


def test_images_are_the_documented_tags_never_latest():
    tags = {kind: documented_tag(p.read_text()) for kind, p in DOCKERFILES.items()}
    version = pyproject()["project"]["version"]
    assert tags == {"gpu": f"ghcr.io/your-org/kanerva-pp:{version}-cu128",
                    "cpu": f"ghcr.io/your-org/kanerva-pp:{version}-cpu"}
    for name, group, _, c in ray_containers():
        gpu = "nvidia.com/gpu" in c["resources"].get("limits", {})
        assert c["image"] == tags["gpu" if gpu else "cpu"], (name, group, c["image"])
        assert not c["image"].endswith(":latest")


def test_ray_version_is_the_installed_and_locked_ray():
    import ray
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__ == lock_pins()["ray"], name


def test_all_clusters_are_the_same_cluster():
    """raycluster.yaml and the RayJobs' clusters differ at most in how many workers they start with."""
    def shape(spec):
        spec = copy.deepcopy(spec)
        for g in spec["workerGroupSpecs"]:
            g.pop("replicas", None)
        return spec
    shapes = {name: shape(spec) for name, spec in cluster_specs().items()}
    first = shapes.pop("raycluster.yaml")
    for name, s in shapes.items():
        assert s == first, name


def test_rayjobs_clean_up_and_bound_their_lifetime():
    for name, job in by_kind("RayJob").items():
        s = job["spec"]
        assert s["shutdownAfterJobFinishes"] is True, name
        assert 0 < s["ttlSecondsAfterFinished"] <= 3600, name
        assert s["activeDeadlineSeconds"] > 0, name
        assert s["backoffLimit"] >= 0, name
        assert s["submissionMode"] == "K8sJobMode", name
        assert "clusterSelector" not in s, name  # each job makes its own cluster


def test_configmap_carries_the_s3_mlflow_and_train_settings():
    from pipeline.cluster.driver import RAY_ENV
    (cm,) = by_kind("ConfigMap").values()
    data = cm["data"]
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"} <= set(data)
    assert data.items() >= RAY_ENV.items()
    assert data["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    assert data["AWS_ENDPOINT_URL"].startswith(("http://", "https://"))
    assert not any(k.startswith("AWS_SECRET") or k == "AWS_ACCESS_KEY_ID" for k in data), "credentials in a ConfigMap"


def test_secret_example_holds_placeholders_only():
    (secret,) = by_kind("Secret").values()
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(values)
    for k, v in values.items():
        assert v.startswith("<") and v.endswith(">") and "your" in v, (k, v)
    assert "EXAMPLE ONLY" in (KUBERAY / "secret.example.yaml").read_text()


# -- the jobs the RayJobs run ---------------------------------------------------------------------------------------
def entrypoints() -> dict[str, list[str]]:
    return {name: shlex.split(job["spec"]["entrypoint"]) for name, job in by_kind("RayJob").items()}


def _durable_url(value: str) -> bool:
    return value.startswith("s3://")


def test_entrypoints_run_the_project_jobs_with_their_configs():
    modules = {}
    for name, argv in entrypoints().items():
        assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), (name, argv)
        module = argv[2].split(".", 1)[1]
        modules[module] = name
        cfg = argv[argv.index("--config") + 1]
        assert not pathlib.PurePath(cfg).is_absolute() and cfg.startswith("jobs/configs/"), (name, cfg)
        job_file = REPO / "jobs" / f"{module}.py"
        if module == "tune" and not job_file.exists():
            # jobs/tune.py and jobs/configs/tune_mnist_gpu.yaml are being written in parallel: until the job exists,
            # only the names are checked (exactly these); once it does, its config must exist too.
            assert cfg == "jobs/configs/tune_mnist_gpu.yaml", cfg
            continue
        assert job_file.is_file(), (name, job_file)
        assert (REPO / cfg).is_file(), (name, cfg)
    assert modules == {"train": "rayjob-train.yaml", "tune": "rayjob-tune.yaml"}


def test_train_entrypoint_is_a_valid_job_on_durable_storage():
    from pipeline.train import config
    argv = entrypoints()["rayjob-train.yaml"]
    cfg_path = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[3:] if "=" in a]
    cfg = config.load(REPO / cfg_path, overrides)
    assert cfg.scaling.use_gpu
    assert _durable_url(cfg.checkpoint.storage_path) and _durable_url(cfg.data.shards), cfg
    assert not cfg.data.source or _durable_url(cfg.data.source)
    assert not cfg.tracking.uri, "tracking goes to the ConfigMap's MLFLOW_TRACKING_URI"
    # the job's GPU workers fit the worker group's bounds
    spec = DOCS["rayjob-train.yaml"]["spec"]["rayClusterSpec"]
    (group,) = spec["workerGroupSpecs"]
    assert group["replicas"] == cfg.scaling.num_workers <= group["maxReplicas"]
    cpu = group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    assert cfg.scaling.cpus_per_worker <= int(cpu)


def test_no_entrypoint_names_relative_storage():
    for name, argv in entrypoints().items():
        for arg in argv[3:]:
            key, eq, value = arg.partition("=")
            if eq and any(w in key for w in ("storage", "shards", "source", "path", "dir", "uri")):
                assert _durable_url(value) or value.startswith(("http://", "https://")), (name, arg)


def test_tune_config_names_durable_storage_once_it_exists():
    argv = entrypoints()["rayjob-tune.yaml"]
    cfg = REPO / argv[argv.index("--config") + 1]
    if not (REPO / "jobs" / "tune.py").exists() and not cfg.exists():
        pytest.skip("jobs/tune.py and its config are not written yet")
    assert cfg.is_file()

    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, str):
            yield path, node

    for key, value in walk(yaml.safe_load(cfg.read_text())):
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("storage_path", "shards", "source") and value:
            assert _durable_url(value), (key, value)
