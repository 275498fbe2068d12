"""One Ray version everywhere, and an image build file that lints clean.

The Ray version is defined in one place, the ``ray[default,train,data]==`` pin in pyproject.toml. The
image's base tag (docker/Dockerfile), the chart (appVersion, rayVersion, image tag), the plain
manifest and the VM cluster config (deploy/) must all say the same, and so must every other
mention of a Ray version in docker/, helm/ and deploy/.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli there
    import tomli as tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy_checks as dc  # noqa: E402

REPO = dc.REPO
DOCKERFILE = REPO / "docker" / "Dockerfile"
VERSION = r"(\d+\.\d+\.\d+)"
# Ways a Ray version is written in the deployment files.
RAY_VERSION_PATTERNS = [
    re.compile(r"rayproject/ray:" + VERSION),
    re.compile(r"\bray(?:\[[^\]]*\])?==" + VERSION),
    re.compile(r"\brayVersion:\s*[\"']?" + VERSION),
    re.compile(r"\bRAY_VERSION=" + VERSION),
    re.compile(r"-ray" + VERSION),
    re.compile(r"\bRay " + VERSION),
]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_pins(requirements: list[str]) -> list[str]:
    pins = []
    for requirement in requirements:
        match = re.fullmatch(r"ray(\[[^\]]*\])?\s*==\s*" + VERSION, requirement.strip())
        if match:
            pins.append(match[2])
    return pins


@pytest.fixture(scope="module")
def ray_version() -> str:
    """The pin of ray[default,train,data] in pyproject.toml: the one definition of the Ray version."""
    project = pyproject()["project"]
    core = [r for r in project["dependencies"] if re.match(r"ray\[[a-z,]*\btrain\b[a-z,]*\]\s*==", r)
            and "data" in r.split("]")[0]]
    assert len(core) == 1, "pyproject.toml must pin ray[default,train,data]==X.Y.Z exactly once"
    (version,) = ray_pins(core)
    return version


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"docker/Dockerfile has no ARG {name}=<default>"
    return match[1].strip("\"'")


def image_tag(image: str) -> str:
    return image.rsplit(":", 1)[1]


def check_image_tag(tag: str, ray_version: str) -> None:
    """Our image tags read <segprop version>-ray<Ray version>-<gpu|cpu>."""
    package = pyproject()["project"]["version"]
    assert re.fullmatch(rf"{re.escape(package)}-ray{re.escape(ray_version)}-(gpu|cpu)", tag), (
        f"image tag {tag!r} should be {package}-ray{ray_version}-gpu (or -cpu)"
    )


def test_every_ray_pin_in_pyproject_agrees(ray_version):
    project = pyproject()["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    assert set(ray_pins(requirements)) == {ray_version}


def test_dockerfile_builds_from_the_pinned_ray(ray_version):
    assert dockerfile_arg("RAY_VERSION") == ray_version
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu"  # one CUDA: torch's (see the next test)
    assert dockerfile_arg("PYTHON_TAG") == "py311"
    assert dockerfile_arg("VARIANT") == "gpu"


def dockerfile_steps() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if re.match(r"^[A-Z]+\s", line.strip())]


def test_the_image_has_one_cuda():
    """The base has no CUDA of its own (Ray's -gpu images carry a CUDA toolkit); the GPU build's CUDA is the one
    torch's PyPI wheels bring, and only the CPU variant points pip at PyTorch's CPU index."""
    steps = dockerfile_steps()
    (base,) = [s for s in steps if s.startswith("FROM ")]
    assert base.endswith("-cpu") and "gpu" not in base and "cu1" not in base
    (torch_step,) = [s for s in steps if s.startswith("RUN ") and "torch==" in s]
    assert 'if [ "${VARIANT}" = "cpu" ]' in torch_step and "whl/cpu" in torch_step
    assert not any(word in " ".join(steps) for word in ("cuda-toolkit", "nvidia/cuda", "apt-get install cuda"))


def test_dependencies_are_installed_before_the_code_is_copied():
    """A code change rebuilds one layer: the pinned dependencies are installed from pyproject.toml and the
    constraints alone, and the package after them without dependencies."""
    steps = dockerfile_steps()
    code = next(i for i, s in enumerate(steps) if s.startswith("COPY ") and "segprop_ray/" in s)
    deps = next(i for i, s in enumerate(steps) if s.startswith("RUN ") and "-r /tmp/segprop/requirements.txt" in s)
    assert deps < code
    copied_before = " ".join(s for s in steps[:deps] if s.startswith("COPY "))
    assert "pyproject.toml" in copied_before and "constraints.txt" in copied_before
    assert "segprop_ray" not in copied_before and "README.md" not in copied_before
    assert "-c /tmp/segprop/constraints.txt" in steps[deps]
    (install,) = [s for s in steps[code:] if s.startswith("RUN ") and "pip install" in s]
    assert "--no-deps /tmp/segprop" in install


def test_dockerfile_torch_matches_the_project_pin():
    makefile = (REPO / "Makefile").read_text()
    constraints = (REPO / "requirements" / "constraints.txt").read_text()
    (make_pin,) = set(re.findall(r"torch==" + VERSION, makefile))
    (constraint_pin,) = re.findall(r"^torch==" + VERSION, constraints, re.MULTILINE)
    assert dockerfile_arg("TORCH_VERSION") == make_pin == constraint_pin


def test_chart_versions(ray_version):
    chart = yaml.safe_load((dc.CHART_DIR / "Chart.yaml").read_text())
    values = yaml.safe_load((dc.CHART_DIR / "values.yaml").read_text())
    assert chart["appVersion"] == ray_version
    assert values["rayVersion"] == ray_version
    check_image_tag(values["image"]["tag"], ray_version)
    for path in sorted((dc.CHART_DIR / "ci").glob("*.yaml")):
        override = yaml.safe_load(path.read_text()) or {}
        assert override.get("rayVersion", ray_version) == ray_version, path.name
        if "tag" in override.get("image", {}):
            check_image_tag(override["image"]["tag"], ray_version)


def test_deploy_files_use_the_pinned_ray(ray_version):
    manifest = dc.parse_manifests([(REPO / "deploy" / "rayjob.yaml").read_text()])
    (job,) = dc.of_kind(manifest, "RayJob")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    images = {container["image"] for _, container in dc.containers(job) if "image" in container}
    assert images, "deploy/rayjob.yaml names no image"
    for image in images:
        check_image_tag(image_tag(image), ray_version)
    cluster = yaml.safe_load((REPO / "deploy" / "cluster-aws.yaml").read_text())
    docker = cluster["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            check_image_tag(image_tag(docker[key]), ray_version)


def deployment_files() -> list[Path]:
    files = [REPO / ".dockerignore"]
    for folder in ("docker", "helm", "deploy"):
        files += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix != ".tgz"]
    return files


def ray_versions_in(text: str) -> set[str]:
    return {m for pattern in RAY_VERSION_PATTERNS for m in pattern.findall(text)}


def test_every_mention_of_a_ray_version_agrees(ray_version):
    stale = {}
    for path in deployment_files():
        found = ray_versions_in(path.read_text(errors="replace")) - {ray_version}
        if found:
            stale[str(path.relative_to(REPO))] = sorted(found)
    assert stale == {}, f"Ray versions other than the pin {ray_version}: {stale}"


def test_version_scan_bites():
    text = "FROM rayproject/ray:2.59.0-py311-gpu\nrayVersion: '2.58.1'\nimage: x:0.1.0-ray2.57.0-gpu\n"
    assert ray_versions_in(text) == {"2.59.0", "2.58.1", "2.57.0"}


# --- the image build ----------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.prefix) / "bin" / "hadolint")
    if not Path(found).exists():
        pytest.fail(f"hadolint is missing (not on PATH, not in {Path(sys.prefix) / 'bin'}): install it: "
                    f"{dc.HADOLINT_INSTALL}", pytrace=False)
    return found


def test_hadolint_passes():
    command = [hadolint(), "--no-color", "--format", "json"]
    config = REPO / "docker" / ".hadolint.yaml"
    if config.exists():
        command += ["--config", str(config)]
    result = subprocess.run([*command, str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], findings or result.stderr


def test_dockerfile_runs_as_the_non_root_ray_user():
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert users and users[-1].split(":")[0] in ("1000", "ray")


def test_dockerfile_carries_no_secrets():
    """No ARG or ENV named like a credential: build args and env end up in the image's history."""
    instructions = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    names = []
    for line in instructions:
        if re.match(r"^(ARG|ENV)\s", line):
            names += re.findall(r"(?:^(?:ARG|ENV)\s+|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", line)
    assert "RAY_VERSION" in names
    assert [n for n in names if dc.SECRET_ENV_NAME.search(n)] == []


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path, or a parent directory of it, decides."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _glob_regex(raw.lstrip("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/config", "runs/r1/manifest.json", ".pytest_cache/v/x", "tests/test_x.py",
     "segprop_ray/__pycache__/cli.cpython-311.pyc", "segprop_ray.egg-info/PKG-INFO", ".env", ".demo/x",
     "helm/segprop/values.yaml", "deploy/cluster-aws.yaml", "docker/Dockerfile"],
)
def test_dockerignore_keeps_out(path):
    assert dockerignore_excludes(dockerignore_patterns(), path)


def test_dockerignore_keeps_what_the_dockerfile_copies():
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]
    assert "pyproject.toml" in sources and "segprop_ray/" in sources
    patterns = dockerignore_patterns()
    for source in sources + ["segprop_ray/config/schema.py"]:
        assert not dockerignore_excludes(patterns, source.rstrip("/")), source
        if source.endswith("/"):
            assert not dockerignore_excludes(patterns, source + "__init__.py"), source


def test_the_transformers_floor_is_the_one_the_code_checks():
    """pyproject.toml's transformers floor is what core.hf_compat refuses below, and the 4.x that make test-compat
    runs is not under it."""
    from segprop_ray.core.hf_compat import MIN_TRANSFORMERS, _release

    floors = [r for r in pyproject()["project"]["dependencies"] if re.match(r"transformers\s*>=", r)]
    assert floors == [f"transformers>={MIN_TRANSFORMERS}"]
    compat = re.search(r"^TF4_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    assert _release(compat) >= _release(MIN_TRANSFORMERS)
