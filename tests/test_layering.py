"""Who may import whom (design.md): core is torch + transformers only; only the pipeline imports Ray."""

import pkgutil
import subprocess
import sys

import segprop_ray


def modules_of(package: str) -> list[str]:
    prefix = f"segprop_ray.{package}."
    return [m.name for m in pkgutil.walk_packages(segprop_ray.__path__, "segprop_ray.") if m.name.startswith(prefix)]


def imported_after(modules: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_core_imports_no_ray_fsspec_or_pyarrow():
    modules = modules_of("core")
    assert "segprop_ray.core.training" in modules
    assert not imported_after(modules) & {"ray", "fsspec", "pyarrow", "s3fs", "pydantic"}


def test_storage_imports_no_ray():
    assert "ray" not in imported_after(modules_of("storage"))
