"""The reporting package stays free of Ray (design.md): it runs wherever a run directory can be read."""

import subprocess
import sys

from test_layering import modules_of


def test_reporting_imports_neither_ray_nor_pyplot():
    modules = modules_of("reporting")  # every module of the package, found on disk: a new one is checked too
    assert {"segprop_ray.reporting.report", "segprop_ray.reporting.status", "segprop_ray.reporting.plots"} <= set(modules)
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    code += "print(sorted(({m.split('.')[0] for m in sys.modules} | set(sys.modules)) & {'ray', 'matplotlib.pyplot'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
