"""A real fine-tuning task from text no one here wrote: the docstrings of Python's standard library.

Every public function, class and method of a fixed list of standard-library modules that has a docstring
becomes one question: "What does `module.name(signature)` do?", answered by the first sentence of its
docstring. Modules are split, not questions: every fifth module (in name order) is held out, so the
evaluation asks about functions the model never saw an answer for. From the held-out modules come

- ``eval.jsonl``: the same questions as conversations (held-out loss of every exit, and of the input model);
- ``mc.jsonl``: multiple-choice items (MMLU layout): the question, and four descriptions to choose from, the
  right one and three of other functions of the same module (scored by log-likelihood, ``cloze`` style).

Everything is deterministic for a given Python: modules and members are visited in name order and the
distractors are drawn with a fixed seed, so the same interpreter writes the same bytes.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path
from typing import Any, Iterator

MODULES = (
    "abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmath", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.utils", "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools",
    "json", "keyword", "linecache", "locale", "logging", "lzma", "math", "mimetypes", "operator", "optparse",
    "os", "os.path", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "pprint", "queue", "quopri",
    "random", "re", "reprlib", "secrets", "shelve", "shlex", "shutil", "smtplib", "socket", "sqlite3",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time",
    "timeit", "tokenize", "traceback", "types", "typing", "unicodedata", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zlib",
)
"""Standard-library modules that import without side effects everywhere."""
HELD_OUT_EVERY = 5
SYSTEM = "You answer questions about the Python standard library in one sentence."
SEED = 1234


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence on one line (None when it is too short or too long to be a description)."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    sentence = paragraph.split(". ")[0].rstrip(".") + "."
    return sentence if 20 <= len(sentence) <= 160 and not sentence.startswith(("..", ">>>")) else None


def signature(obj: Any) -> str:
    """``(a, b=1)`` where Python can tell it the same way in every interpreter, else ``(...)`` (a default that shows a
    memory address or an unordered set would change from run to run)."""
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return "(...)" if re.search(r" at 0x|[{}]", text) else text


def members(module_name: str) -> Iterator[tuple[str, str]]:
    """``(qualified name with signature, description)`` of every documented public function, class and method."""
    module = importlib.import_module(module_name)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) not in (module_name, module_name.split(".")[0]):
            continue
        if inspect.isclass(obj):
            yield from _described(f"{module_name}.{name}", obj)
            for method_name, method in sorted(vars(obj).items()):
                if not method_name.startswith("_") and (inspect.isfunction(method) or inspect.ismethoddescriptor(method)):
                    yield from _described(f"{module_name}.{name}.{method_name}", method)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield from _described(f"{module_name}.{name}", obj)


def _described(qualified: str, obj: Any) -> Iterator[tuple[str, str]]:
    doc = inspect.getdoc(obj)
    sentence = first_sentence(doc) if doc else None
    if sentence:
        yield f"{qualified}{signature(obj)}", sentence


def question(qualified: str) -> str:
    """The question a record asks about ``qualified`` (name and signature)."""
    return f"What does `{qualified}` do?"


def chat(qualified: str, answer: str) -> dict[str, Any]:
    """One conversation: a short system message, the question, the docstring's first sentence."""
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question(qualified)},
                         {"role": "assistant", "content": answer}]}


def mc_items(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict[str, Any]]:
    """One item per member of a held-out module with at least four distinct descriptions: the right one and three
    others of the same module, in a seeded order."""
    items = []
    for qualified, answer in pairs:
        others = sorted({a for q, a in pairs if a != answer})
        if len(others) < 3:
            continue
        choices = rng.sample(others, 3) + [answer]
        rng.shuffle(choices)
        items.append({"question": question(qualified), "choices": choices, "answer": choices.index(answer)})
    return items


def spread(records: list[Any], limit: int | None) -> list[Any]:
    """``limit`` of ``records`` at evenly spaced positions (every module keeps its share); all when ``None``."""
    if limit is None or limit >= len(records):
        return records
    return [records[i * len(records) // limit] for i in range(limit)]


def build(out: str | Path, max_train: int | None = None, max_eval: int | None = None,
          max_mc: int | None = None) -> dict[str, Any]:
    """Write ``train.jsonl``, ``eval.jsonl``, ``mc.jsonl`` and ``sources.json`` under ``out``; returns the counts.

    ``max_train`` / ``max_eval`` keep that many examples spread evenly over the modules; ``max_mc`` samples items.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    train, evaluation, mc, sources = [], [], [], {"python": sys.version.split()[0], "held_out": [], "trained": []}
    for index, name in enumerate(MODULES):
        pairs = list(dict.fromkeys(members(name)))  # in name order, duplicates (aliases) once
        held_out = index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        sources["held_out" if held_out else "trained"].append(name)
        if held_out:
            evaluation += [chat(q, a) for q, a in pairs]
            mc += mc_items(pairs, rng)
        else:
            train += [chat(q, a) for q, a in pairs]
    train, evaluation = spread(train, max_train), spread(evaluation, max_eval)
    mc = rng.sample(mc, min(len(mc), max_mc or len(mc)))
    for file_name, records in (("train.jsonl", train), ("eval.jsonl", evaluation), ("mc.jsonl", mc)):
        (out / file_name).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    counts = {"train": len(train), "eval": len(evaluation), "mc": len(mc)}
    (out / "sources.json").write_text(json.dumps({**sources, "counts": counts}, indent=2, sort_keys=True) + "\n")
    return counts


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else ".real_model/data"))
