"""The ``segprop`` command: run, status, export, report, compare, submit and the embedded demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, Callable

from segprop_ray.pipeline.failures import one_line_reason
from segprop_ray.pipeline.termination import Terminated, stop_on_sigterm

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 bad input, 1 failure, 128 + 15 stopped by SIGTERM),
    reason on one line. SIGTERM (a RayJob stopped, ``kill``) unwinds like Ctrl-C: a driver releases its run
    directory's lease and records why it stopped."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with stop_on_sigterm():
            return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("segprop: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    except Terminated as stopped:
        print(f"segprop: {stopped}", file=sys.stderr)
        return int(stopped.code)
    except Exception as error:  # noqa: BLE001 - every failure ends as one line (traceback with SEGPROP_DEBUG=1)
        if os.environ.get("SEGPROP_DEBUG"):
            raise
        kind = "error" if is_bad_input(error) else "failed"
        print(f"segprop: {kind}: {one_line_reason(error, with_type=kind == 'failed')}", file=sys.stderr)
        return EXIT_BAD_INPUT if kind == "error" else EXIT_FAILED


def is_bad_input(error: BaseException) -> bool:
    """Whether ``error`` is the user's input (config, paths, model) rather than a failure while running."""
    kinds: list[type] = [FileNotFoundError]
    for module, name in _BAD_INPUT_CLASSES:  # an error of a class can only exist once its module is loaded:
        loaded = sys.modules.get(module)      # looking there keeps torch and pyarrow out of a config error
        if loaded is not None:
            kinds.append(getattr(loaded, name))
    return isinstance(error, tuple(kinds)) or type(error) is ValueError


_BAD_INPUT_CLASSES = (("segprop_ray.config.loading", "ConfigError"),
                      ("segprop_ray.core.layout", "UnsupportedArchitecture"),
                      ("segprop_ray.storage.errors", "StorageError"))
"""Error classes that mean bad input, by module (checked only if the module is loaded)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="segprop", description="Segmented Propagation fine-tuning on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = _command(sub, "run", "run (or continue) a SegProp pipeline", _run)
    run.add_argument("config", help="YAML config file")
    _add_overrides(run)
    run.add_argument("--restart", action="store_true", help="start over in a run_dir that holds another run")
    status = _command(sub, "status", "show a run's per-layer table", _status)
    status.add_argument("run_dir")
    _add_storage_options(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--watch", type=float, default=0, metavar="SECONDS",
                        help="redraw every SECONDS until the run is done or failed")
    export = _command(sub, "export", "write the model exiting at a depth as a Hugging Face directory", _export)
    export.add_argument("run_dir")
    export.add_argument("--depth", default="final", help="a committed depth, 'best' (lowest eval loss) or 'final'")
    export.add_argument("--out", required=True, help="output directory (local path or URI)")
    _add_storage_options(export)
    report = _command(sub, "report", "write the per-depth report (Markdown, JSON, CSV, PNG plots)", _report)
    report.add_argument("run_dir")
    report.add_argument("--compare", action="append", default=[], metavar="RUN_DIR",
                        help="another run (e.g. its lw or e2e counterpart) to draw beside it (repeatable)")
    report.add_argument("--out", default=None, help="output directory (default: the run's report/ directory)")
    _add_storage_options(report)
    _add_compare(sub)
    submit = _command(sub, "submit", "submit `segprop run` to a Ray cluster through the Jobs API", _submit)
    submit.add_argument("config")
    submit.add_argument("--address", required=True, help="dashboard address, e.g. http://HEAD:8265")
    _add_overrides(submit)
    submit.add_argument("--no-wait", action="store_true", help="return after submitting")
    submit.add_argument("--working-dir", default=None, help="upload this directory as the job's working_dir")
    submit.add_argument("--python", default=None,
                        help="run the job as PYTHON -m segprop_ray.cli (default: the cluster's `segprop` command)")
    demo = _command(sub, "demo", "make a tiny model and corpus, then run SegProp on them (local Ray)", _demo)
    demo.add_argument("--out", default=".demo", help="directory for the model, data, config and run")
    _add_overrides(demo)
    return parser


def _add_compare(sub: Any) -> None:
    """`segprop compare`: its spec or config, the runs, the compare directory, overrides for every run."""
    compare = _command(sub, "compare", "run a set of runs (modes, depths) on the same model and data, each resumable, "
                       "and write one report of them (the paper's Table 1 and Figure 2)", _compare)
    compare.add_argument("source", metavar="SPEC_OR_CONFIG",
                         help="a compare spec (YAML with config:, runs:, optional out: and set:) or a run config")
    compare.add_argument("--runs", action="append", default=[], metavar="MODE[:KEY=VALUE,...]",
                         help="a run, e.g. segprop:p=1, lw:p=18, e2e, segprop:p=18,ll=4,name=deep, lora:lora_r=16; keys p "
                              "(base depth), ll (last layers), lora_r (LoRA rank), name, or any config field "
                              "(repeatable; replaces the spec's runs)")
    compare.add_argument("--out", default=None, help="compare directory (local path or URI): runs/<name>/ and report/")
    _add_overrides(compare)
    compare.add_argument("--report-only", action="store_true",
                         help="run nothing: write the report of the runs already in the compare directory")


def _command(sub: Any, name: str, help_text: str, handler: Callable) -> argparse.ArgumentParser:
    command = sub.add_parser(name, help=help_text, description=help_text)
    command.set_defaults(handler=handler)
    return command


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set training.learning_rate=1e-4 (repeatable)")


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for the run's store (and --out, if any), e.g. "
                             "endpoint_url=http://minio:9000 (repeatable; VALUE is read as YAML, a.b=c nests)")


def parse_storage_options(items: list[str]) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` items as a storage_options mapping (VALUE read as YAML, ``a.b`` keys nest;
    values never appear in errors)."""
    from segprop_ray.config.loading import apply_overrides

    return apply_overrides({}, items, flag="--storage-option", example="endpoint_url=http://minio:9000", secret=True)


def _run(args: argparse.Namespace) -> int:
    from segprop_ray.config import load_config

    cfg = load_config(args.config, args.overrides)  # bad config fails in a fraction of a second, before Ray and torch
    from segprop_ray.pipeline.driver import Driver

    Driver(cfg, restart=args.restart).run()
    return _status_of(cfg.run_dir, cfg.storage_options)


def _status_of(run_dir: str, storage_options: dict[str, Any] | None = None) -> int:
    from segprop_ray.reporting.export import open_run
    from segprop_ray.reporting.status import render_status

    _, manifest = open_run(run_dir, storage_options)
    render_status(manifest)
    return 0


def _status(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options)  # before the heavy imports: a typo fails at once
    from segprop_ray.reporting.export import open_run
    from segprop_ray.reporting.status import render_status, status_json

    while True:
        _, manifest = open_run(args.run_dir, options)
        if args.json:
            print(status_json(manifest))
        else:
            render_status(manifest)
        if not args.watch or manifest.state != "running":
            return 0
        time.sleep(args.watch)


def _export(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options)
    from segprop_ray.reporting.export import parse_depth
    from segprop_ray.reporting.model_card import export_with_card

    depth, out = export_with_card(args.run_dir, args.out, parse_depth(args.depth), options)
    print(f"exported exit {depth} to {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_options)
    from segprop_ray.reporting.report import write_report

    written = write_report(args.run_dir, args.out, args.compare, options)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from segprop_ray.config.compare import load_compare

    compare = load_compare(args.source, args.runs, args.out, args.overrides)  # every run checked before Ray and torch
    from segprop_ray.pipeline.compare import run_compare

    written = run_compare(compare, report_only=args.report_only)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from segprop_ray.pipeline.submit import submit_run

    return submit_run(args.config, args.address, args.overrides, wait=not args.no_wait, working_dir=args.working_dir,
                      python=args.python)


def _demo(args: argparse.Namespace) -> int:
    from segprop_ray.demo.run import run_demo

    return run_demo(args.out, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
