"""Model specs and the shipped-model registry: checksums verified at load, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from inference_helpers import fresh_cache, phantom_inputs, save_tiny_checkpoint, tiny_spec  # noqa: F401 (fixtures)

from inline.inference import ChecksumMismatch, ModelSpec, ModelSpecError, get_model, load_network, shipped_spec
from inline.inference.registry import SHIPPED_MODELS, models_dir
from inline.inference.spec import sha256_file
from models.varnet import VarNet


def test_load_network_builds_the_checkpoint_config_with_its_weights(tiny_spec):
    net, meta = load_network(tiny_spec)
    assert isinstance(net, VarNet) and not net.training
    assert net.config["cascades"] == 2 and net.config["chans"] == 4
    saved = torch.load(tiny_spec.weights, weights_only=True)["state_dict"]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    assert meta == {"steps": 0, "seed": 0}
    assert not any(p.requires_grad for p in net.parameters())


def test_checksum_mismatch_names_file_expected_and_actual(tiny_spec):
    wrong = "0" * 64
    spec = ModelSpec("tiny", tiny_spec.weights, wrong)
    with pytest.raises(ChecksumMismatch) as info:
        load_network(spec)
    message = str(info.value)
    assert str(tiny_spec.weights) in message and wrong in message and tiny_spec.sha256 in message
    assert (info.value.path, info.value.expected, info.value.actual) == (tiny_spec.weights, wrong, tiny_spec.sha256)


def test_get_model_raises_the_checksum_mismatch_instead_of_falling_back(tiny_spec):
    with pytest.raises(ChecksumMismatch):
        get_model(ModelSpec("tiny", tiny_spec.weights, "f" * 64), preference=["onnxruntime", "eager"], device="cpu")


def test_a_rewritten_weights_file_fails_its_old_checksum(tiny_spec):
    save_tiny_checkpoint(tiny_spec.weights, seed=1)  # what a training run's checkpoint rewrite does
    with pytest.raises(ChecksumMismatch):
        load_network(tiny_spec)


@pytest.mark.parametrize("digest", ["abc", "g" * 64, ""])
def test_a_malformed_checksum_is_refused_when_the_spec_is_made(tmp_path, digest):
    with pytest.raises(ModelSpecError, match="64 hex digits"):
        ModelSpec("x", tmp_path / "x.pt", digest)


def test_checksums_are_normalised_to_lower_case(tiny_spec):
    assert ModelSpec("tiny", tiny_spec.weights, tiny_spec.sha256.upper()).sha256 == tiny_spec.sha256


def test_missing_and_foreign_files_name_the_path(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(ModelSpecError, match="missing.pt"):
        load_network(ModelSpec("m", missing, "0" * 64))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelSpecError, match="not a torch checkpoint"):
        load_network(ModelSpec.from_file(junk))
    bare = tmp_path / "bare.pt"
    torch.save({"weights": {}}, bare)
    with pytest.raises(ModelSpecError, match="state_dict"):
        load_network(ModelSpec.from_file(bare))


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "t.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["chans"] = 8
    torch.save(checkpoint, path)
    with pytest.raises(ModelSpecError, match="do not fit"):
        load_network(ModelSpec.from_file(path))


def test_registry_reads_the_sidecar_and_loads_the_shipped_model(tmp_path):
    (tmp_path / "weights").mkdir()
    weights = save_tiny_checkpoint(tmp_path / "weights" / "varnet_mni152.pt")
    (tmp_path / "varnet_mni152.json").write_text(json.dumps({"weights": "weights/varnet_mni152.pt", "sha256": sha256_file(weights)}))
    spec = shipped_spec("varnet_mni152", directory=tmp_path)
    assert spec.weights == weights and spec.sha256 == sha256_file(weights) and spec.name == "varnet_mni152"
    model = get_model(spec, preference=["eager"], device="cpu")
    k, mask, acs = phantom_inputs()
    assert model.run(k, mask, acs).shape == k.shape


def test_registry_without_a_checksum_says_where_to_write_it(tmp_path):
    assert SHIPPED_MODELS["varnet_mni152"].sha256 is None  # published in the sidecar only
    with pytest.raises(ModelSpecError, match="varnet_mni152.json"):
        shipped_spec("varnet_mni152", directory=tmp_path)


def test_unknown_shipped_model_lists_the_known_ones():
    with pytest.raises(ModelSpecError, match="varnet_mni152"):
        shipped_spec("resnet")
    with pytest.raises(ModelSpecError, match="unknown model"):
        get_model("resnet")


def test_the_published_varnet_matches_its_sidecar():
    """The real shipped model loads against its published sidecar and runs."""
    assert (models_dir() / "varnet_mni152.json").is_file()
    spec = shipped_spec("varnet_mni152")
    model = get_model(spec, preference=["eager"], device="cpu")
    k, mask, acs = phantom_inputs(coils=8, n=64)
    out = model.run(k, mask, acs)
    assert out.shape == k.shape and out.dtype == k.dtype
