"""Chain config lookup, parsing and validation messages."""

import pytest

from inline.config import ConfigError, apply_overrides, load_chain, parse_chain, resolve_config_name, validate_chain


@pytest.mark.parametrize("name", ["default", "default.xml", "default.yaml", "default\x00\x00"])
def test_default_names_resolve_to_the_same_file(name):
    assert resolve_config_name(name).name == "default.yaml"


@pytest.mark.parametrize("name", ["nope", "../etc/passwd", "", ".hidden"])
def test_unknown_or_unsafe_names_are_errors(name):
    with pytest.raises(ConfigError):
        resolve_config_name(name)


def test_unknown_config_lists_available():
    with pytest.raises(ConfigError, match=r"unknown config 'nope' \(available: .*default"):
        load_chain("nope")


def test_unknown_gadget_is_reported_with_position():
    spec = parse_chain("name: t\ngadgets:\n  - {name: a, class: RemoveReadoutOversampling}\n  - {name: b, class: NoSuchGadget}\n")
    with pytest.raises(ConfigError, match=r"config 't', gadget #2 'b': unknown gadget 'NoSuchGadget'"):
        validate_chain(spec)


def test_unknown_and_ill_typed_parameters():
    spec = parse_chain("name: t\ngadgets:\n  - {name: combine, class: CoilCombine, parameters: {colour: red}}\n")
    with pytest.raises(ConfigError, match=r"config 't', gadget #1 'combine' \(CoilCombine\): unknown parameter 'colour' \(known: .*method"):
        validate_chain(spec)
    spec = parse_chain("name: t\ngadgets:\n  - {name: finish, class: ImageFinish, parameters: {image_series_index: many}}\n")
    with pytest.raises(ConfigError, match=r"gadget #1 'finish' \(ImageFinish\): image_series_index: .*'many'"):
        validate_chain(spec)


def test_bad_yaml_and_shapes():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_chain("gadgets: [", origin="x")
    with pytest.raises(ConfigError, match="no gadgets"):
        parse_chain("name: t\ngadgets: []\n")
    with pytest.raises(ConfigError, match="duplicate name 'a'"):
        parse_chain("name: t\ngadgets:\n  - {name: a, class: X}\n  - {name: a, class: Y}\n")


def test_overrides_by_stage_dotted_and_bare_name():
    spec = load_chain("default")
    combine = next(g.name for g in spec.gadgets if g.class_ == "CoilCombine")
    new, unused = apply_overrides(spec, {f"{combine}.method": "walsh", "customconfig": "x"})
    assert next(g for g in new.gadgets if g.name == combine).parameters["method"] == "walsh"
    assert unused == ["customconfig"]
    new, unused = apply_overrides(spec, {"method": "walsh"})
    assert next(g for g in new.gadgets if g.name == combine).parameters["method"] == "walsh"
    new, _ = apply_overrides(spec, {combine: {"method": "walsh"}})
    assert next(g for g in new.gadgets if g.name == combine).parameters["method"] == "walsh"
    validate_chain(new)


def test_parameters_declared_with_an_alias_override_by_alias():
    """CompressedSensing declares ``lam`` with the config name ``lambda`` (a Python keyword)."""
    new, unused = apply_overrides(load_chain("cs"), {"lambda": 0.01})
    assert unused == []
    stage = next(s for s in validate_chain(new) if s.name == next(g.name for g in new.gadgets if g.class_ == "CompressedSensing"))
    assert stage.params.lam == 0.01


def test_hybrid_readouts_only_reach_gadgets_that_accept_them():
    """RemoveReadoutOversampling output_domain hybrid before a gadget that needs k-space (GRAPPA)
    is refused at configuration, naming both stages and the fix; the default chain is hybrid."""
    from inline.config import load_chain

    grappa = load_chain("grappa")
    spec, _ = apply_overrides(grappa, {"oversampling.output_domain": "hybrid"})
    with pytest.raises(ConfigError, match=r"'grappa' \(GRAPPA\) needs k-space ReconBuffer but 'oversampling' emits hybrid"):
        validate_chain(spec)
    validate_chain(grappa)  # k-space readouts: fine
    stages = validate_chain(load_chain("default"))
    (over,) = [s for s in stages if s.name == "oversampling"]
    assert over.params.output_domain == "hybrid"
