"""The reporting package stays free of Ray (design.md): it runs wherever a run directory can be read."""

import subprocess
import sys

REPORTING_MODULES = ["mc_eval", "mc_items", "nhsic", "report", "report_text", "plots", "model_card", "export", "export_stream",
                     "status"]


def test_reporting_imports_neither_ray_nor_pyplot():
    code = "import sys\n" + "".join(f"import segprop_ray.reporting.{m}\n" for m in REPORTING_MODULES)
    code += "print(sorted(({m.split('.')[0] for m in sys.modules} | set(sys.modules)) & {'ray', 'matplotlib.pyplot'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
