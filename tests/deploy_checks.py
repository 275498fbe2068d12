"""Offline checks of the deployment files (chart, manifests, cluster configs, image).

Used by tests/test_deploy_chart.py and tests/test_versions.py. Nothing here needs a cluster, a
``helm`` binary or the network: the chart is rendered with the Helm library bundled in
``helm-python-sdk``, and manifests are validated with ``jsonschema`` against the KubeRay CRD
schemas kept in tests/data/kuberay/, made strict the way ``kubeconform -strict`` does.

Run as a script to print the chart README's values table, or to rewrite it in the README:
    .venv/bin/python tests/deploy_checks.py values-table
    .venv/bin/python tests/deploy_checks.py update-readme
"""

from __future__ import annotations

import copy
import functools
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import jsonschema
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


def load_yaml(path: Path) -> Any:
    """One YAML document, with the C loader (the CRD files are over a megabyte)."""
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader)


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


@functools.lru_cache(maxsize=1)
def load_chart():  # -> helm_python.chart.Chart
    from helm_python.chart import Chart

    return Chart.load(str(CHART_DIR))


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


# --- values.yaml documentation -------------------------------------------------------------

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[^\s#:'\"-][^:]*?|\"[^\"]+\"|'[^']+'):(?:\s|$)")
DOC_START = re.compile(r"^\s*# -- ?(?P<text>.*)$")
COMMENT = re.compile(r"^\s*#(?P<text>.*)$")
# helm-docs' type hint at the start of a description: `# -- (int) ...`.
TYPE_HINT = re.compile(r"^\((?P<type>[a-z]+)\)\s*")


def documented_keys(values_text: str) -> dict[tuple[str, ...], str]:
    """Key path -> description, for every key preceded by a ``# --`` comment (helm-docs style).

    Keys inside list items are not keys of the values (they belong to list entries) and are
    skipped; a ``# --`` comment runs until the key line, continuing over further ``#`` lines.
    """
    docs: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    list_indent: int | None = None
    for line in values_text.splitlines():
        if not line.strip():
            pending = None
            continue
        indent = len(line) - len(line.lstrip(" "))
        if list_indent is not None and (indent > list_indent or line.lstrip().startswith("- ")):
            continue
        list_indent = None
        start, comment = DOC_START.match(line), COMMENT.match(line)
        if start:
            pending = [start["text"].strip()]
            continue
        if comment:
            if pending is not None:
                pending.append(comment["text"].strip())
            continue
        if line.lstrip().startswith("- "):
            list_indent = indent
            continue
        match = KEY_LINE.match(line)
        if not match:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = match["key"].strip("\"'")
        stack.append((indent, key))
        if pending is not None:
            docs[tuple(k for _, k in stack)] = " ".join(p for p in pending if p)
        pending = None
    return docs


def all_keys(values: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path of a values mapping (not descending into lists)."""
    if isinstance(values, dict):
        for key, value in values.items():
            path = prefix + (str(key),)
            yield path
            yield from all_keys(value, path)


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def schema_node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The schema that declares ``path`` as a field (through ``properties``, or through
    ``additionalProperties`` of a structured type such as a worker group); None when the path is
    content of a free-form map (labels, nodeSelector, ...)."""
    node = schema
    for part in path:
        node = _resolve(schema, node)
        if part in node.get("properties", {}):
            node = node["properties"][part]
            continue
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and "properties" in _resolve(schema, extra):
            node = extra
            continue
        return None
    return _resolve(schema, node)


def values_doc_errors(values_text: str, schema: dict[str, Any]) -> list[str]:
    """Keys of values.yaml that the schema declares but that no ``# --`` comment covers, and
    schema fields missing from values.yaml.

    A key is covered by its own comment, by being a section whose keys have comments, or by lying
    inside a documented key that is a row of the table (no documented key below it: the row shows
    its whole default). The run config (``config``) is documented by segprop's own schema.
    """
    values, docs = yaml.safe_load(values_text), documented_keys(values_text)
    rows = {path for path in docs if not _has_docs_below(path, docs)}
    errors = []
    for path in all_keys(values):
        if path[0] == "config" or schema_node(schema, path) is None:
            continue
        covered = path in docs or _has_docs_below(path, docs) or any(path[:i] in rows for i in range(1, len(path)))
        if not covered:
            errors.append(f"{'.'.join(path)}: no '# --' comment")
    for path in [()] + list(all_keys(values)):
        node = schema_node(schema, path) if path else schema
        value = _get(values, path)
        if path[:1] == ("config",) or node is None or not isinstance(value, dict):
            continue
        missing = set(node.get("properties", {})) - set(value)
        errors += [f"{'.'.join(path + (key,))}: in values.schema.json, not in values.yaml" for key in sorted(missing)]
    return errors


def _has_docs_below(path: tuple[str, ...], docs: Iterable[tuple[str, ...]]) -> bool:
    return any(len(other) > len(path) and other[: len(path)] == path for other in docs)


def _get(values: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        values = values[part]
    return values


def values_table(values_text: str) -> str:
    """The README's values table (helm-docs layout) from values.yaml and its ``# --`` comments."""
    values, docs = yaml.safe_load(values_text), documented_keys(values_text)
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for path, text in docs.items():
        value = _get(values, path)
        default = "see below" if _has_docs_below(path, docs) else _default_cell(value)
        hint = TYPE_HINT.match(text)
        kind, text = (hint["type"], text[hint.end() :]) if hint else (_type_name(value), text)
        rows.append(f"| {'.'.join(path)} | {kind} | {default} | {text.replace('|', '&#124;')} |")
    return "\n".join(rows)


def _type_name(value: Any) -> str:
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "string"), (list, "list"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _default_cell(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"))
    if len(text) > 100:
        return "see values.yaml"
    return f"`{text}`".replace("|", "&#124;")


README_TABLE_START = "<!-- values-table:start -->"
README_TABLE_END = "<!-- values-table:end -->"


def readme_table(readme_text: str) -> str:
    """The table between the README's values-table markers."""
    start = readme_text.index(README_TABLE_START) + len(README_TABLE_START)
    return readme_text[start : readme_text.index(README_TABLE_END)].strip()


def main(argv: list[str]) -> int:
    table = values_table((CHART_DIR / "values.yaml").read_text())
    if argv[1:] == ["values-table"]:
        print(table)
        return 0
    if argv[1:] == ["update-readme"]:
        readme = CHART_DIR / "README.md"
        text = readme.read_text()
        start = text.index(README_TABLE_START) + len(README_TABLE_START)
        readme.write_text(f"{text[:start]}\n{table}\n{text[text.index(README_TABLE_END):]}")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
