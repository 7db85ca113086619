"""Chain configs: declarative YAML, looked up by name, validated with precise messages.

A chain config is an ordered list of gadgets, each with a unique ``name``, a ``class``
(a registered gadget name or ``"module:Class"``) and ``parameters`` checked against the
gadget's declared ``Params`` model (Gadgetron's ``default.xml`` in YAML, without code)::

    name: default
    description: Standard Cartesian chain
    gadgets:
      - name: noise
        class: NoiseAdjust
      - name: combine
        class: CoilCombine
        parameters: {method: rss}

Session parameter overrides (python-ismrmrd-server / OpenRecon: a TEXT message
``{"parameters": {...}}`` before the first acquisition) are applied with
:func:`apply_overrides`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inline.gadget import Gadget, GadgetParams
from inline.registry import UnknownGadget, lookup

log = logging.getLogger(__name__)

#: The configs shipped with the project.
BUILTIN_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_SUFFIXES = (".yaml", ".yml", ".xml")


class ConfigError(ValueError):
    """A chain config that cannot be found, parsed or validated; the message says where."""


class GadgetSpec(BaseModel):
    """One entry of a chain config."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(description="unique name of this stage within the chain")
    class_: str = Field(alias="class", description="registered gadget class name or 'module:Class'")
    parameters: dict[str, Any] = Field(default_factory=dict)
    budget_ms: float | None = Field(None, gt=0, description="latency budget per message of this gadget [ms]")


class ChainSpec(BaseModel):
    """A whole chain config, as parsed from YAML (not yet validated against gadget classes)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    budget_ms: float | None = Field(None, gt=0, description="latency budget from last readout to image sent [ms]")
    gadgets: list[GadgetSpec]


@dataclass(frozen=True)
class Stage:
    """A validated chain entry: gadget class and its parameter instance."""

    name: str
    cls: type[Gadget]
    params: GadgetParams
    budget_ms: float | None = None


def config_search_path(extra: list[Path] | None = None) -> list[Path]:
    """Directories searched for config names: ``extra``, then ``$INLINE_CONFIG_PATH``
    (os.pathsep separated), then the project's ``configs/``."""
    dirs = list(extra or [])
    env = os.environ.get("INLINE_CONFIG_PATH")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(BUILTIN_CONFIG_DIR)
    return dirs


def available_configs(search_path: list[Path] | None = None) -> list[str]:
    """Names of every config on the search path."""
    names: set[str] = set()
    for d in search_path or config_search_path():
        if d.is_dir():
            names.update(p.stem for p in d.iterdir() if p.suffix in (".yaml", ".yml"))
    return sorted(names)


def resolve_config_name(name: str, search_path: list[Path] | None = None) -> Path:
    """Path of the config called ``name``; ``default``, ``default.xml`` and
    ``default.yaml`` all name ``configs/default.yaml``.

    Raises:
        ConfigError: unknown name, or a name with a path in it (it comes off the network).
    """
    stem = name.strip().rstrip("\x00")
    for suffix in _SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if not stem or "/" in stem or "\\" in stem or stem.startswith("."):
        raise ConfigError(f"invalid config name {name!r}")
    dirs = search_path or config_search_path()
    for d in dirs:
        for suffix in (".yaml", ".yml"):
            p = d / f"{stem}{suffix}"
            if p.is_file():
                return p
    raise ConfigError(
        f"unknown config {name!r} (available: {', '.join(available_configs(dirs)) or 'none'})"
    )


def parse_chain(text: str, origin: str = "<config text>") -> ChainSpec:
    """Parse YAML chain text; raises :class:`ConfigError` naming ``origin``."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {origin}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {origin}: expected a mapping with 'name' and 'gadgets', got {type(raw).__name__}")
    raw.setdefault("name", origin)
    try:
        spec = ChainSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"config {origin}: {_format_errors(e)}") from e
    if not spec.gadgets:
        raise ConfigError(f"config {spec.name!r}: the chain has no gadgets")
    seen: set[str] = set()
    for i, g in enumerate(spec.gadgets, 1):
        if g.name in seen:
            raise ConfigError(f"config {spec.name!r}, gadget #{i}: duplicate name {g.name!r}")
        seen.add(g.name)
    return spec


def load_chain(name_or_path: str | Path, search_path: list[Path] | None = None) -> ChainSpec:
    """Load a chain by config name or by a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return parse_chain(p.read_text(), origin=str(p))
    path = resolve_config_name(str(name_or_path), search_path)
    return parse_chain(path.read_text(), origin=path.stem)


def validate_chain(spec: ChainSpec) -> list[Stage]:
    """Check every gadget class and parameter; raises :class:`ConfigError` with the config
    name, the gadget's position and name, and what is wrong."""
    stages = []
    for i, g in enumerate(spec.gadgets, 1):
        where = f"config {spec.name!r}, gadget #{i} {g.name!r}"
        try:
            cls = lookup(g.class_)
        except UnknownGadget as e:
            raise ConfigError(f"{where}: {e}") from e
        try:
            params = cls.Params.model_validate(g.parameters)
        except ValidationError as e:
            raise ConfigError(f"{where} ({cls.__name__}): {_format_errors(e, cls.Params)}") from e
        stages.append(Stage(g.name, cls, params, g.budget_ms))
    check_domains(stages, spec.name)
    check_early_snapshots(stages, spec.name)
    return stages


def check_early_snapshots(stages: list[Stage], chain: str = "") -> None:
    """Refuse a chain whose early snapshots (:class:`inline.buffers.EarlySnapshot`) would not
    reach a gadget that uses them.

    After a stage whose class has ``emits_early(params)`` true (an accumulator with
    ``early_lines``), the first stage that takes buffers (taps and stages that only move them,
    ``forwards_snapshots``, e.g. ``ToDevice``, aside) must list ``EarlySnapshot`` in ``accepts``
    (``FFTRecon``): a gadget that changed the complete buffer in between would make the
    snapshot's image wrong.

    Raises:
        ConfigError: naming the accumulator, the stage in the way (or none), and the fix.
    """
    from inline.buffers import EarlySnapshot, ReconBuffer

    for i, st in enumerate(stages):
        emits_early = getattr(st.cls, "emits_early", None)
        if emits_early is None or not emits_early(st.params):
            continue
        consumer = None
        for later in stages[i + 1 :]:
            if getattr(later.cls, "tap", False) or getattr(later.cls, "forwards_snapshots", False):
                continue
            if any(issubclass(t, (ReconBuffer, EarlySnapshot)) for t in later.cls.accepts):
                consumer = later
                break
        if consumer is None or EarlySnapshot not in consumer.cls.accepts:
            where = f"{consumer.name!r} ({consumer.cls.__name__}) takes its buffers" if consumer else "no later gadget takes them"
            raise ConfigError(
                f"config {chain!r}, gadget {st.name!r} sends early snapshots (early_lines) but {where}; "
                f"put FFTRecon right after it or set {st.name}.early_lines: 0"
            )


def check_domains(stages: list[Stage], chain: str = "") -> None:
    """Refuse a chain that would feed hybrid-space data (:mod:`inline.buffers`) to a gadget that
    needs k-space.

    A stage whose class has ``emits_hybrid(params)`` true (``RemoveReadoutOversampling``
    with ``output_domain: hybrid``) may only be followed by stages that either take no readouts
    or buffers (``ismrmrd.Acquisition``, ``ReconBuffer``) or declare ``accepts_hybrid = True``.

    Raises:
        ConfigError: naming the hybrid stage, the stage that needs k-space, and the fix.
    """
    import ismrmrd

    from inline.buffers import ReconBuffer

    source = None
    for i, st in enumerate(stages, 1):
        if source is not None and not getattr(st.cls, "accepts_hybrid", False):
            takes = [t.__name__ for t in st.cls.accepts if issubclass(t, (ismrmrd.Acquisition, ReconBuffer))]
            if takes:
                raise ConfigError(
                    f"config {chain!r}, gadget #{i} {st.name!r} ({st.cls.__name__}) needs k-space {'/'.join(takes)} but "
                    f"{source!r} emits hybrid-space data (readout already transformed); set {source}.output_domain: kspace "
                    f"or move {st.name!r} before {source!r}"
                )
        emits_hybrid = getattr(st.cls, "emits_hybrid", None)
        if emits_hybrid is not None and emits_hybrid(st.params):
            source = st.name


def apply_overrides(spec: ChainSpec, overrides: dict[str, Any]) -> tuple[ChainSpec, list[str]]:
    """Apply session parameters to a chain.

    Keys may be ``"stage.param"``, ``{"stage": {"param": v}}``, or a bare ``"param"``
    that applies to every stage whose gadget declares it. Keys that match nothing are
    returned (OpenRecon sends its UI's own keys too) so the caller can log them; values of
    the wrong type are caught later by :func:`validate_chain`.
    """
    stages = {g.name: g for g in spec.gadgets}
    new_params = {g.name: dict(g.parameters) for g in spec.gadgets}
    unused = []
    for key, value in overrides.items():
        if key in stages and isinstance(value, dict):
            new_params[key].update(value)
        elif "." in key and key.split(".", 1)[0] in stages:
            stage, param = key.split(".", 1)
            new_params[stage][param] = value
        else:
            hit = False
            for g in spec.gadgets:
                try:
                    fields = lookup(g.class_).Params.model_fields
                except UnknownGadget:
                    continue
                if key in fields or any(f.alias == key for f in fields.values()):
                    new_params[g.name][key] = value
                    hit = True
            if not hit:
                unused.append(key)
    gadgets = [g.model_copy(update={"parameters": new_params[g.name]}) for g in spec.gadgets]
    return spec.model_copy(update={"gadgets": gadgets}), unused


def _format_errors(e: ValidationError, model: type[BaseModel] | None = None) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden" and model is not None:
            known = ", ".join(f.alias or n for n, f in model.model_fields.items()) or "none"
            parts.append(f"unknown parameter {loc!r} (known: {known})")
        else:
            parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)
