"""The driver: a small state machine over tokenize -> Stage 1 -> snapshot -> (train q -> snapshot q)* -> export.

Its only state is the run manifest. Every step first asks the manifest (and, for shards, their
commit markers) whether it is already done, so the same command started again continues from the
last committed step and never redoes committed work; a Ray Train iteration interrupted mid-way
resumes from its own latest checkpoint (same run name).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from segprop_ray.config import Config
from segprop_ray.core.exits import RunExit
from segprop_ray.core.plan import Iteration
from segprop_ray.pipeline.cluster import apply_train_settings, check_cluster, data_label_selector
from segprop_ray.pipeline.context import JobContext
from segprop_ray.pipeline.evaluations import Evaluations
from segprop_ray.pipeline.export_job import run_export
from segprop_ray.pipeline.failures import one_line_reason
from segprop_ray.pipeline.plan_checks import check_block_orders
from segprop_ray.pipeline.prepare import RunSetup, prepare_run
from segprop_ray.pipeline.progress import ProgressBoard, Throttle
from segprop_ray.pipeline.runtime import connect
from segprop_ray.pipeline.snapshot_job import run_snapshot_job
from segprop_ray.pipeline.stage_job import ensure_staged, model_source
from segprop_ray.pipeline.termination import keep_sigterm_handler
from segprop_ray.pipeline.tokenize_job import tokenize_and_pack
from segprop_ray.pipeline.train_job import run_trainer
from segprop_ray.pipeline.verify_job import check_committed
from segprop_ray.storage.layout import SPLITS
from segprop_ray.storage.manifest import LayerRecord, Manifest, ManifestStore, now
from segprop_ray.storage.snapcheck import apply_retention, commit_depth
from segprop_ray.storage.snapshot_resume import clear_written, recorded_files
from segprop_ray.storage.tokenize_state import clear_state
from segprop_ray.storage.weights_store import snapshot_weights_hash


class Driver:
    """Runs (or continues) the SegProp pipeline of one run directory."""

    def __init__(self, cfg: Config, restart: bool = False, echo: Callable[[str], None] = print):
        self.cfg, self.restart, self.echo = cfg, restart, echo
        self.setup: RunSetup | None = None
        self.checked: set[tuple[str, int | None, str]] = set()
        """Shards known good in this process: written by it, or re-hashed against their marker once."""
        self.board: Any = None
        """The workers' progress board (a Ray actor), made by :meth:`run`; without one no bar is drawn."""

    @property
    def manifest(self) -> Manifest:
        """The run's manifest (after :meth:`prepare`)."""
        assert self.setup is not None
        return self.setup.manifest

    def prepare(self) -> RunSetup:
        """Check everything cheap first (config vs model, data, run directory), then open or create the run."""
        self.setup = prepare_run(self.cfg, self.restart)
        self.store = ManifestStore(self.setup.layout, guard=self.setup.lease.check)
        return self.setup

    def run(self) -> Manifest:
        """The whole pipeline; returns the final manifest."""
        try:  # prepared inside: a SIGTERM between preparing and running still releases the lease
            if self.setup is None:
                self.prepare()
            self._run_recording_failure()
        finally:
            if self.setup is not None:
                self.setup.lease.release()
        return self.manifest

    def _start(self) -> None:
        with keep_sigterm_handler():  # a SIGTERM still releases the lease and records why (see .termination)
            connect(self.cfg)
        check_cluster(self.cfg)
        apply_train_settings(self.cfg)
        self.board = ProgressBoard.remote()
        self.evaluations = Evaluations(self)
        self._save(lambda m: setattr(m, "state", "running"))  # also when continuing a failed run

    def _run_recording_failure(self) -> None:
        """Connect and run the steps; any failure, a SIGTERM's :class:`~.termination.Terminated` included, is recorded
        in the manifest with its cause (``failed``: the same command continues)."""
        try:
            self._start()
            self._run_steps()
        except BaseException as error:
            self._save(lambda m: m.mark_failed(one_line_reason(error, with_type=True)))
            raise

    def _run_steps(self) -> None:
        plan = self.setup.plan
        ensure_staged(self)  # the input model into the run directory, once (a remote run directory)
        self.tokenize()
        check_block_orders(self.cfg, self.manifest.tokens["train"]["num_blocks"], self.setup.spec.group_size)
        self.evaluations.start_baseline()
        self.train_depth(plan.base_depth)
        self.evaluations.start(plan.base_depth)
        if not plan.spec.end_to_end:
            for it in plan.iterations[1:]:  # Stage 2's segments (an MLP half continues its layer's attention half)
                source = plan.source_depth(it)
                if it.part != "mlp" and not self._continue_after(source):
                    break
                self.ensure_snapshot(source)
                self.train_depth(it.key)
                if it.commits_depth:
                    self.evaluations.collect()  # the previous exit was scored while this segment trained
                    self.evaluations.start(it.last)
            else:
                self._continue_after(plan.last_depth)  # records the closing "last_layer" decision
        self.evaluations.collect()
        final = max(self.manifest.committed_depths())
        self._save(lambda m: setattr(m, "final_depth", final))
        self.export(final)
        self._save(lambda m: (setattr(m, "state", "done"), setattr(m, "error", None)))

    def export(self, depth: int) -> None:
        """Export the model exiting at ``depth`` to ``export/exit-<depth>`` in the run directory."""
        name = f"export:{depth}"
        if self.manifest.step(name).status == "done":
            return
        started = self._start_step(name)
        out = self.setup.layout.uri(self.setup.layout.export_dir(f"exit-{depth}"))
        self._finish_step(name, started, run_export(self._context(depth), depth, out))  # on a worker
        self.echo(f"exported exit {depth} (layers 0..{depth} + LL) to {out}")

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self) -> None:
        """Write the token shards of both splits, unless committed with the run's tokenization."""
        setup = self.setup
        if all(self._committed(split, None) for split in SPLITS):
            return
        self.echo("tokenizing and packing the data (Ray Data)")
        started = self._start_step("tokenize")
        with data_label_selector(self.cfg.resources.cpu.label_selector):  # the CPU group, off the GPU nodes
            splits, examples = tokenize_and_pack(self._context(depth=-1), setup.spec, setup.tokens_hash,
                                                 self._files_progress("tokenize"))
        for split, written in splits.items():
            commit_depth(setup.layout, split, None, written.files, setup.tokens_hash, setup.spec)
            self.checked.add((split, None, setup.tokens_hash))
        clear_state(setup.layout)
        tokens = {split: {"num_blocks": s.count, "files": len(s.files), "seq_len": setup.spec.seq_len}
                  for split, s in splits.items()}
        self._finish_step("tokenize", started, {**tokens, "examples": examples})
        self._save(lambda m: (setattr(m, "tokens", tokens), setattr(m, "examples", examples)))
        self.echo("blocks: " + ", ".join(f"{k} {v['num_blocks']}" for k, v in tokens.items()) + _truncation(examples))

    # -- training -------------------------------------------------------------------------------
    def train_depth(self, key: int | str) -> None:
        """Train and commit the iteration ``key`` of the plan (a depth: the iteration that commits it, Stage 1 at
        the base depth; ``<q>-attn``: layer q's attention half), unless already committed."""
        it = self.setup.plan.iteration(key)
        record, name = self.manifest.layers.get(it.key), f"{self.manifest.run_id}-depth{it.key}"
        if record is not None and record.status == "done":
            self._drop_checkpoints(name)  # left behind if a driver died right after the commit
            return
        ctx = self._context(it.last, input_hash=self._hash_of(self.setup.plan.source_depth(it)), part=it.part)
        started = self._start_layer(it)
        self.echo(f"training {it.label} (Ray Train)")
        result = run_trainer(ctx, name=name, stage=it.stage, board=self.board, label=it.label,
                             on_progress=lambda record: self._save(lambda m: m.record_progress(it.key, record)))
        self._finish_layer(it, started, result)
        self._drop_checkpoints(name)
        self.echo(f"committed {it.label}: eval loss {result['eval_loss']:.4f} after {result['steps']} steps "
                  f"({result['decision']['reason']})")

    def _drop_checkpoints(self, name: str) -> None:
        """Remove a committed iteration's Ray Train checkpoints (weights and optimizer state): the layer files
        are what later steps read, and a committed iteration is never trained again."""
        layout = self.setup.layout
        directory = layout.checkpoints_dir(name)
        if layout.fs.exists(directory):
            layout.fs.rm(directory, recursive=True)

    def _continue_after(self, depth: int) -> bool:
        """The global exit criterion after committing ``depth``: train the next layer or stop."""
        decisions = {d["depth"]: d for d in self.manifest.decisions}
        if depth not in decisions:
            losses = {d: self.manifest.layer(d).eval_loss for d in self.manifest.committed_depths()}
            decision = RunExit.from_config(self.cfg.exit.run).decide(losses, depth, self.setup.plan.last_depth)
            decisions[depth] = vars(decision)
            self._save(lambda m: m.decisions.append(vars(decision)))
            self.echo(f"global exit after layer {depth}: {decision.reason} ({decision.detail})")
        return bool(decisions[depth]["continue_training"])

    # -- snapshots ------------------------------------------------------------------------------
    def ensure_snapshot(self, depth: int) -> None:
        """Make S[depth] committed for both splits with the committed weights, regenerating what is not."""
        if all(self._committed(split, depth) for split in SPLITS):
            return
        plan = self.setup.plan
        source = plan.source_depth(plan.iteration(depth))  # S[depth] is made from the previous exit's snapshot
        if source is not None:
            self.ensure_snapshot(source)
        layout, expected = self.setup.layout, self._hash_of(depth)
        recorded = {split: recorded_files(layout, split, depth, expected) for split in SPLITS}
        candidates = sum(map(len, recorded.values()))
        note = f": {candidates} file(s) of an earlier attempt to check" if candidates else ""
        self.echo(f"snapshot S[{depth}] (Ray Data){note}")
        started = self._start_step(f"snapshot:{depth}")
        ctx = self._context(depth, input_hash=self._hash_of(source))
        files = run_snapshot_job(ctx, self.setup.model_info.hidden_size, recorded, self._snapshot_progress(depth))
        for split in SPLITS:
            commit_depth(layout, split, depth, files.all(split), expected, self.setup.spec)
            clear_written(layout, split, depth)
            self.checked.add((split, depth, expected))
            deleted = apply_retention(layout, split, self.cfg.snapcheck.keep_depths, protect=[depth])
            self.checked = {key for key in self.checked if key[:2] not in {(split, d) for d in deleted}}
        outputs = {**_snapshot_outputs(files.written, time.time() - started), **files.sizing()}
        self._finish_step(f"snapshot:{depth}", started, {**outputs, "kept_files": {s: len(files.kept[s]) for s in SPLITS}})

    def _snapshot_progress(self, depth: int) -> Callable[[str, Any], None]:
        """A per-file callback of S[depth]'s job: files written per split, in the manifest every 10 s."""
        total = {split: self.setup.spec.num_files(self.manifest.tokens[split]["num_blocks"]) for split in SPLITS}
        done, report = {split: 0 for split in SPLITS}, self._files_progress(f"snapshot:{depth}")

        def on_file(split: str, _info: Any) -> None:
            done[split] += 1
            report(done, total)

        return on_file

    def _files_progress(self, step: str) -> Callable[[dict[str, int], dict[str, int]], None]:
        """A callback ``report(done, total)`` writing ``files_done``/``files_total`` of a running ``step`` to the
        manifest, at most every 10 s (what ``segprop status`` shows)."""
        throttle = Throttle()

        def report(done: dict[str, int], total: dict[str, int]) -> None:
            if throttle.ready():
                self._save(lambda m: m.step(step).outputs.update(files_done=dict(done), files_total=dict(total)))

        return report

    def _committed(self, split: str, depth: int | None) -> bool:
        tokens = self.manifest.tokens.get(split, {})
        if not tokens:
            return False
        layout, expected = self.setup.layout, self._hash_of(depth)
        key = (split, depth, expected)
        if key in self.checked:
            return True
        # Shards this process did not write (a resumed run) are re-hashed against their marker once (by Ray tasks on
        # workers: the driver reads no shard bytes), so a corrupted file of the right size is regenerated, not used.
        check_cluster(self.cfg, when="(a node joined the cluster)")  # before the Ray tasks that check the files
        marker, reason = check_committed(layout, split, depth, expected, tokens["num_blocks"], self.setup.spec,
                                         self.cfg.resources.cpu.ray_options())
        if marker is not None:
            self.checked.add(key)
        if marker is None and layout.fs.exists(layout.commit_marker(split, depth)):
            self.echo(f"{split} {'tokens' if depth is None else f'snapshot S[{depth}]'} cannot be used ({reason}): regenerating")
        return marker is not None

    def _hash_of(self, depth: int | None) -> str:
        """Weights hash of S[depth]: the embedding file and layers 0..depth (tokens: the tokenization's hash)."""
        if depth is None:
            return self.setup.tokens_hash
        return snapshot_weights_hash(self.manifest.committed_files(), depth)

    # -- bookkeeping ------------------------------------------------------------------------------
    def _context(self, depth: int, input_hash: str = "", part: str = "layer") -> JobContext:
        """The context of a Ray job about to start, after checking that the cluster still suits the run directory."""
        check_cluster(self.cfg, when="(a node joined the cluster)")  # every job the driver launches gets a context
        blocks = {split: info.get("num_blocks", 0) for split, info in self.manifest.tokens.items()}
        return JobContext(self.cfg.model_dump(mode="json"), depth, self.setup.spec.group_size, blocks,
                          self.manifest.committed_files(), input_hash, model_source(self.manifest), part)

    def _save(self, change: Callable[[Manifest], Any]) -> None:
        self.store.update(self.manifest, change)

    def _start_step(self, name: str) -> float:
        def change(m: Manifest) -> None:
            step = m.step(name)
            step.status, step.started, step.attempts, step.error = "running", now(), step.attempts + 1, None

        self._save(change)
        return time.time()

    def _finish_step(self, name: str, started: float, outputs: dict[str, Any]) -> None:
        def change(m: Manifest) -> None:
            step = m.step(name)
            step.status, step.finished, step.wall_s, step.outputs = "done", now(), round(time.time() - started, 2), outputs

        self._save(change)

    def _start_layer(self, it: Iteration) -> float:
        def change(m: Manifest) -> None:
            record = m.layers.setdefault(it.key, LayerRecord(depth=it.last, stage=it.stage, part=it.part,
                                                             first=it.first, label=it.label))
            record.status, record.started = "running", record.started or now()

        self._save(change)
        return time.time()

    def _finish_layer(self, it: Iteration, started: float, result: dict[str, Any]) -> None:
        def change(m: Manifest) -> None:
            record = m.layers[it.key]
            for key in ("steps", "train_loss", "eval_loss", "perplexity", "decision", "history", "files", "exit_file",
                        "kept_step"):
                setattr(record, key, result[key])
            record.metrics = {**result["metrics"], "driver_wall_s": round(time.time() - started, 2)}
            record.status, record.finished = "done", now()

        self._save(change)


def _snapshot_outputs(written: dict[str, list], wall_s: float) -> dict[str, Any]:
    """What a snapshot job wrote, and how fast (bytes written per second of the whole job)."""
    rows = {split: sum(info.rows for info in infos) for split, infos in written.items()}
    size = sum(info.bytes for infos in written.values() for info in infos)
    return {"files": {split: len(infos) for split, infos in written.items()}, "rows": rows, "bytes": size,
            "written_mb_per_s": round(size / max(wall_s, 1e-9) / 1e6, 2)}


def _truncation(examples: dict[str, dict[str, int]]) -> str:
    """``"; 3 of 120 train examples truncated to seq_len"`` and the like, or '' when none was."""
    notes = [f"{s['truncated']} of {s['examples']} {stream} examples truncated to seq_len"
             + (f", {s['dropped']} dropped (no target token left)" if s["dropped"] else "")
             for stream, s in examples.items() if s["truncated"]]
    return "; " + "; ".join(notes) if notes else ""
