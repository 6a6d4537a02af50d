"""toolkit.sdk.checkpoint: every weight is loaded or named; safetensors files and shards; key remapping."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from toolkit.sdk.checkpoint import (
    CheckpointError,
    check_complete,
    load_into,
    load_state_dict_files,
    remap_keys,
    safetensors_keys,
    strip_prefix,
    weight_files,
)


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("freqs", torch.ones(2), persistent=False)


def _file_tensors(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(10, 4, generator=g), "body.weight": torch.randn(4, 4, generator=g),
            "body.bias": torch.randn(4, generator=g), "norm.weight": torch.randn(4, generator=g),
            "norm.bias": torch.randn(4, generator=g), "scale": torch.randn(4, generator=g)}


def test_complete_checkpoint_loads_every_tensor_and_counts_the_tied_head_as_derived():
    m = Tied()
    sd = _file_tensors()
    report = load_into(m, {**sd, "extra.weight": torch.zeros(1)}, source="ck", layout="toy")
    for k, v in sd.items():
        assert torch.equal(m.state_dict()[k], v)
    assert report.n_params == 7 and report.missing == [] and report.derived == ["head.weight"]
    assert sorted(report.loaded) == sorted(sd) and report.unexpected == ["extra.weight"]
    attrs = report.to_attrs()
    assert attrs["n_loaded"] == 6 and attrs["n_unexpected"] == 1 and attrs["layout"] == "toy"
    json.dumps(attrs)


def test_a_missing_weight_is_one_line_naming_it_and_the_layout():
    sd = _file_tensors()
    del sd["body.bias"], sd["norm.weight"]
    with pytest.raises(CheckpointError) as e:
        load_into(Tied(), sd, source="ck.safetensors", layout="toy layout")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("ck.safetensors: 2 of 7 weights are not in the checkpoint (recognised layout: toy layout)")
    assert "first missing: body.bias, norm.weight" in msg and "--allow-missing" in msg


def test_allow_missing_returns_the_missing_names():
    sd = _file_tensors()
    del sd["scale"]
    report = load_into(Tied(), sd, source="ck", layout="toy", allow_missing=True)
    assert report.missing == ["scale"] and report.to_attrs()["missing"] == ["scale"]


def test_derived_names_are_accepted_explicitly():
    m = Tied()
    report = check_complete(m, ["embed.weight", "body.weight", "body.bias", "norm.weight", "norm.bias"],
                            source="ck", layout="toy", derived=["scale"])
    assert report.missing == [] and set(report.derived) == {"scale", "head.weight"}


def test_a_shape_mismatch_is_one_line():
    sd = _file_tensors()
    sd["body.weight"] = torch.zeros(4, 5)
    with pytest.raises(CheckpointError, match=r"weight body.weight has shape \(4, 5\) in the checkpoint but \(4, 4\)"):
        load_into(Tied(), sd, source="ck", layout="toy")


def test_remap_first_rule_wins_and_strip_prefix():
    sd = {"model.a.x": 1, "model.b": 2, "other": 3}
    assert remap_keys(sd, [(r"model\.a\.", "A."), (r"model\.", "")]) == {"A.x": 1, "b": 2, "other": 3}
    assert strip_prefix({"module.model.w": 1}, ["module.", "model."]) == {"model.w": 1}
    with pytest.raises(CheckpointError, match="both map to"):
        remap_keys({"model.w": 1, "w": 2}, [(r"model\.", "")])


def test_sharded_safetensors_are_read_through_the_index(tmp_path):
    sd = _file_tensors()
    keys = list(sd)
    save_file({k: sd[k] for k in keys[:3]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[3:]}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= 3)}-of-00002.safetensors"
                                            for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert [f.name for f in weight_files(tmp_path)] == ["model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"]
    assert sorted(safetensors_keys(tmp_path)) == sorted(keys)
    loaded = load_state_dict_files(tmp_path)
    assert all(torch.equal(loaded[k], sd[k]) for k in keys)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* is missing"):
        weight_files(tmp_path)


def test_an_empty_directory_says_what_it_looked_for(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        weight_files(tmp_path)


def test_random_weights_flag_reaches_the_adapter_and_the_store_says_random_init(tmp_path):
    from click.testing import CliRunner

    import toolkit
    from toolkit.cli.main import cli

    store = tmp_path / "r.zarr"
    res = CliRunner().invoke(cli, ["extract", "--model", "pi0", "--store", str(store), "--max-episodes", "1",
                                   "--max-steps", "1", "--random-weights", "--allow-missing", "--no-progress"])
    assert res.exit_code == 0, res.output
    model = toolkit.open_store(store).attrs["model"]
    assert model["random_init"] is True and model["load_report"] is None
