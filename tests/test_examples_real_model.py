"""The real-model example's data: the standard library's docstrings, split by module, the same bytes every time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "real_model" / "stdlib_task.py"


def build_in_a_fresh_interpreter(out: Path) -> dict[str, bytes]:
    subprocess.run([sys.executable, str(SCRIPT), str(out)], check=True, capture_output=True, timeout=120)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_data_preparation_is_deterministic_and_held_out_by_module(tmp_path):
    first, second = build_in_a_fresh_interpreter(tmp_path / "a"), build_in_a_fresh_interpreter(tmp_path / "b")
    assert first == second and set(first) == {"train.jsonl", "eval.jsonl", "mc.jsonl", "sources.json"}
    sources = json.loads(first["sources.json"])
    assert sources["counts"]["train"] > 1000 and sources["counts"]["eval"] > 200 and sources["counts"]["mc"] > 200
    held_out = set(sources["held_out"])
    asked = lambda name: {json.loads(line)["messages"][1]["content"].split("`")[1].split("(")[0]  # noqa: E731
                          for line in first[name].decode().splitlines()}
    trained, evaluated = asked("train.jsonl"), asked("eval.jsonl")
    assert not trained & evaluated  # no question of the evaluation is trained on
    assert all(any(q.startswith(m + ".") for m in held_out) for q in evaluated)
    for line in first["mc.jsonl"].decode().splitlines():
        item = json.loads(line)
        assert len(set(item["choices"])) == 4 and 0 <= item["answer"] < 4
