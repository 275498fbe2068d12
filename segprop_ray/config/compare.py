"""``segprop compare``: a set of runs on the same model and data, each in a run directory of its own, as data.

A run is written ``MODE[:KEY=VALUE,...]`` on the command line (``segprop:p=1``, ``lw:p=18``, ``e2e``,
``lora:lora_r=16``, ``segprop:p=18,ll=4,training.learning_rate=1e-4,name=deep-lr``) or as a mapping under
``runs:`` in a compare spec. The short keys are :data:`RUN_KEYS`: ``p`` is ``segprop.base_depth``, ``ll`` is
``segprop.last_layers`` (the paper's r), ``lora_r`` is the LoRA rank ``segprop.adapter.r`` (PEFT's r); a bare
``r`` would mean one to a reader of the paper and the other to a PEFT user, so it is refused. ``name`` names the
run's directory (``<out>/runs/<name>``), any other key is a config field as ``--set`` takes it. The mode is any
mode the config accepts.

Every run starts from the one config: a setting of the segmented algorithm that the run's mode does nothing with
(``segprop.base_depth`` for ``e2e`` and ``lora``, ``segprop.last_layers`` for them and ``lw``, see
:data:`~segprop_ray.config.segprop.USED_BY`) is taken back to its default for that run when the config or the
set-wide overrides give it, and refused when the run itself does. Every run is checked here, before any work: a
bad value, an unknown mode, a duplicate name or a run on other data than the rest is refused in one line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from segprop_ray.config.loading import ConfigError, format_validation_error, load_config
from segprop_ray.config.schema import Config
from segprop_ray.config.segprop import ADAPTER_REFUSED, USED_BY, SegPropConfig, unused_settings
from segprop_ray.config.training import Strict
from segprop_ray.core.plan import MODES

RUN_KEYS = {"p": "segprop.base_depth", "ll": "segprop.last_layers", "lora_r": "segprop.adapter.r"}
"""Short keys of a run spec -> the config field each sets (in this order in a run's default name)."""
AMBIGUOUS_KEYS = {"r": "write ll=N for the last layers (segprop.last_layers, the paper's r) or lora_r=N for the "
                       "LoRA rank (segprop.adapter.r)"}
"""Keys a run spec refuses, with what to write instead."""
SET_BY_COMPARE = ("run_dir", "segprop.mode")
"""Fields the comparison sets itself (the run's directory under ``out``, the run's mode): never overridden."""
SHARED_SETTINGS = ("model", "data", "evaluation", "storage_options", "resources.address", "resources.num_cpus")
"""Settings every run of a comparison must share: the same model, data and evaluation (else the columns are not
comparable), and the same storage and Ray (the runs run one after another on one Ray)."""
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ITEM_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w.]*\s*=)")  # a comma that starts the next KEY=, not one inside a value


class RunSpec(Strict):
    """One run of a comparison."""

    mode: str
    """The run's ``segprop.mode`` (``segprop``, ``lw``, ``e2e``, or any other the config accepts)."""
    p: int | None = None
    """``segprop.base_depth`` (None: the config's)."""
    ll: int | None = None
    """``segprop.last_layers``, the paper's r (None: the config's)."""
    lora_r: int | None = None
    """``segprop.adapter.r``, the LoRA rank (None: the config's; given, the run trains LoRA adapters)."""
    name: str | None = None
    """The run's directory name under ``<out>/runs`` and its column in the report (default: the mode and the short
    keys given)."""
    set: list[str] = []
    """Further ``KEY=VALUE`` config overrides of this run only."""

    @model_validator(mode="before")
    @classmethod
    def _no_ambiguous_key(cls, data: Any) -> Any:
        for key, hint in AMBIGUOUS_KEYS.items():
            if isinstance(data, dict) and key in data:
                raise ValueError(f"key {key!r} is ambiguous: {hint}")
        return data

    def check_keys_fit_the_mode(self) -> None:
        """A one-line ConfigError for a short key whose setting the run's mode does nothing with (``e2e:p=3``)."""
        for key, value in self.short_keys():
            setting = RUN_KEYS[key].removeprefix("segprop.")
            if self.mode in MODES and setting in USED_BY and setting in unused_settings(self.mode):
                raise ConfigError(f"run {_spec_text(self)!r}: {key}={value} ({RUN_KEYS[key]}) does nothing in mode "
                                  f"{self.mode}; leave it out")

    def short_keys(self) -> list[tuple[str, int]]:
        """The short keys given, with their values, in :data:`RUN_KEYS` order."""
        return [(key, getattr(self, key)) for key in RUN_KEYS if getattr(self, key) is not None]

    def default_name(self) -> str:
        """``segprop-p1-ll2``, ``lw-p18``, ``lora-lora_r16``, ``e2e``: the mode and the short keys given."""
        return "-".join([self.mode, *(f"{key}{value}" for key, value in self.short_keys())])

    def overrides(self) -> list[str]:
        """The run's ``--set`` overrides: its mode, the settings its mode does nothing with back at their defaults
        (whatever the config gave them), its short keys, then its own."""
        fields = [f"segprop.mode={self.mode}"]
        fields += [f"segprop.{name}={SegPropConfig.model_fields[name].default}" for name in unused_settings(self.mode)]
        own_adapter = self.lora_r is not None or any(item.startswith("segprop.adapter") for item in self.set)
        if self.mode in ADAPTER_REFUSED and not own_adapter:  # the set's LoRA runs' adapter is not this run's
            fields.append("segprop.adapter=null")
        fields += [f"{RUN_KEYS[key]}={value}" for key, value in self.short_keys()]
        return fields + list(self.set)


class CompareSpec(Strict):
    """A compare spec file: the run config, where the comparison goes, and its runs."""

    config: str
    """The run config every run starts from (a path, relative to the spec file)."""
    out: str | None = None
    """The compare directory (local path or any fsspec URI): ``runs/<name>`` per run and ``report/``."""
    set: list[str] = []
    """``KEY=VALUE`` config overrides of every run."""
    runs: list[RunSpec | str] = Field(min_length=1)
    """The runs, as ``MODE[:KEY=VALUE,...]`` text or as mappings (``{mode: segprop, p: 1}``)."""


@dataclass
class CompareRun:
    """A run of the set, resolved: its name, how it was written, its overrides and its validated config."""

    name: str
    text: str
    overrides: list[str]
    cfg: Config


@dataclass
class CompareSet:
    """The resolved comparison: where it goes and its runs, in order."""

    out: str
    storage_options: dict[str, Any]
    runs: list[CompareRun]
    spec: dict[str, Any]
    """How the set was given (config path, overrides, runs as written), for the report."""


def parse_run(text: str) -> RunSpec:
    """``MODE[:KEY=VALUE,...]`` as a :class:`RunSpec` (one-line ConfigError naming the bad part)."""
    mode, _, rest = text.strip().partition(":")
    if not mode.strip():
        raise ConfigError(f"run {text!r}: no mode; write MODE[:KEY=VALUE,...], e.g. segprop:p=1")
    fields: dict[str, Any] = {"mode": mode.strip(), "set": []}
    for item in (part.strip() for part in _ITEM_SPLIT.split(rest) if part.strip()):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ConfigError(f"run {text!r}: {item!r} is not KEY=VALUE (keys: {', '.join(RUN_KEYS)}, name or a "
                              "config field)")
        if key in AMBIGUOUS_KEYS:
            raise ConfigError(f"run {text!r}: key {key!r} is ambiguous: {AMBIGUOUS_KEYS[key]}")
        if key in (*RUN_KEYS, "name"):
            fields[key] = value
        else:
            fields["set"].append(f"{key}={value}")
    return _run_spec(fields, text)


def _run_spec(fields: dict[str, Any], shown: str) -> RunSpec:
    try:
        return RunSpec.model_validate(fields)
    except ValidationError as err:
        raise ConfigError(f"run {shown!r}: {format_validation_error(err).removeprefix('config: ')}") from None


def load_compare(source: str | Path, runs: list[str] = (), out: str | None = None,
                 overrides: list[str] = ()) -> CompareSet:
    """The comparison given by ``source`` (a compare spec, or a run config with ``runs``), every run validated.

    With a spec, ``runs`` (when given) replace its runs, ``out`` its ``out``, and ``overrides`` follow its
    ``set``. The input model is scored by the first run only (``evaluation.baseline`` off in the others).
    """
    source = Path(source)
    spec = _read_spec(source)
    if spec is not None:
        config = Path(spec.config) if Path(spec.config).is_absolute() else source.parent / spec.config
        specs = [parse_run(item) if isinstance(item, str) else item for item in spec.runs]
        out, overrides = out or _beside(source, spec.out), [*spec.set, *overrides]
    else:
        config, specs = source, []
    specs = [parse_run(text) for text in runs] or specs
    if not specs:
        raise ConfigError(f"{source} is a run config: name the runs with --runs MODE[:KEY=VALUE,...] (repeatable), "
                          "or give a compare spec (a YAML with config: and runs:)")
    if not out:
        raise ConfigError("no compare directory: pass --out DIR (or out: in the compare spec)")
    return _resolve(config, specs, _absolute(out), list(overrides))


def _read_spec(source: Path) -> CompareSpec | None:
    """The compare spec in ``source``, or None when it is a run config (no ``runs:`` key)."""
    if not source.is_file():
        raise ConfigError(f"config file not found: {source}")
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({str(err).strip().splitlines()[0]})") from None
    if not isinstance(raw, dict) or "runs" not in raw:
        return None
    try:
        return CompareSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation_error(err).removeprefix('config: ')}") from None


def _beside(spec_file: Path, out: str | None) -> str | None:
    """The spec's ``out``: a relative local path is relative to the spec file (as its ``config`` is)."""
    if out is None or "://" in out or Path(out).is_absolute():
        return out
    return str(spec_file.parent / out)


def _absolute(out: str) -> str:
    """A local compare directory as an absolute path (its runs' directories are named from it)."""
    return out if "://" in out else os.path.abspath(out)


def _resolve(config: Path, specs: list[RunSpec], out: str, overrides: list[str]) -> CompareSet:
    _refuse_reserved("--set", overrides)
    names = [spec.name or spec.default_name() for spec in specs]
    _check_names(names)
    runs = []
    for name, spec in zip(names, specs):
        spec.check_keys_fit_the_mode()
        _refuse_reserved(f"run {name!r}", spec.set)
        run_overrides = [*overrides, *spec.overrides(), f"run_dir={out.rstrip('/')}/runs/{name}"]
        try:
            cfg = load_config(config, run_overrides)
        except ConfigError as err:
            raise ConfigError(f"run {name!r}: {err}") from None
        runs.append(CompareRun(name, _spec_text(spec), run_overrides, cfg))
    _check_shared(runs)
    for run in runs[1:]:
        run.cfg.evaluation.baseline = False  # the input model is the same for every run: score it once
    spec = {"config": str(config), "overrides": overrides, "runs": {run.name: run.text for run in runs}}
    return CompareSet(out, runs[0].cfg.storage_options, runs, spec)


def _spec_text(spec: RunSpec) -> str:
    """The run as ``MODE[:KEY=VALUE,...]`` text (its name included)."""
    items = [f"{key}={value}" for key, value in spec.short_keys()]
    items += [f"name={spec.name}"] if spec.name is not None else []
    items += spec.set
    return spec.mode + (":" + ",".join(items) if items else "")


def _refuse_reserved(where: str, overrides: list[str]) -> None:
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in SET_BY_COMPARE:
            raise ConfigError(f"{where}: {key} is set by the comparison (each run goes to <out>/runs/<name>, "
                              "its mode is the run's MODE); leave it out")


def _check_names(names: list[str]) -> None:
    for name in names:
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (up to 64 characters)")
    seen: dict[str, int] = {}
    for index, name in enumerate(names, 1):
        if name in seen:
            raise ConfigError(f"duplicate run name {name!r} (runs {seen[name]} and {index}): give one a name, "
                              f"e.g. MODE:p=...,name={name}-b")
        seen[name] = index


def _check_shared(runs: list[CompareRun]) -> None:
    first = runs[0]
    for run in runs[1:]:
        for setting in SHARED_SETTINGS:
            if _field(run.cfg, setting) != _field(first.cfg, setting):
                raise ConfigError(f"runs {first.name!r} and {run.name!r} differ in {setting}: every run of a "
                                  "comparison uses the same model, data, evaluation and storage; set it for all runs")


def _field(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value
