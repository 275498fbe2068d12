"""A deploy tool that is missing fails the deploy tests with the command that installs it: it never turns them
into skips that a green run would hide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import deploy_checks as dc

TESTS = Path(__file__).resolve().parent

# Runs pytest on the chart test files in a child process where ``import helm_python`` fails.
WITHOUT_HELM = """
import sys
sys.modules["helm_python"] = None
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:randomly", *sys.argv[1:]]))
"""


def test_chart_tests_fail_with_the_install_command_when_helm_python_sdk_is_missing():
    files = [str(TESTS / "test_deploy_chart.py"), str(TESTS / "test_deploy_chart_cluster.py")]
    done = subprocess.run([sys.executable, "-c", WITHOUT_HELM, *files], cwd=TESTS.parent, capture_output=True,
                          text=True, timeout=300)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode != 0, summary
    assert "skipped" not in summary, summary
    assert "passed" not in summary, summary  # every chart test needs the renderer
    assert dc.HELM_INSTALL in done.stdout
