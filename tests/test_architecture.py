"""The built-in model adapters know their experts and sites before they build a model (``architecture()``), so
`toolkit extract` rejects a bad selection before any weight loads, and what they say is what the loaded model has."""

import warnings

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from toolkit.cli.main import cli
from toolkit.sdk.plugins import registry
from toolkit.sdk.names import format_indices
from toolkit.testing import check_architecture

pytestmark = pytest.mark.usefixtures("pi0_single_thread")
BUILT_IN = ("openvla", "pi0", "robovlms")
LAST_LAYER = {"pi0": ("vlm", 5), "openvla": ("llm", 1), "robovlms": ("text", 3)}  # the tiny defaults' depths


def _extract(*args):
    res = CliRunner().invoke(cli, ["extract", *map(str, args), "--dataset", "libero", "--max-episodes", "1",
                                   "--max-steps", "1", "--no-progress"])
    return res.exit_code, res.output


def _never_built(monkeypatch, name):
    cls = registry()["model"][name].obj

    def never(self, *args, **kwargs):
        raise AssertionError(f"{name} was built before the selection was checked")

    monkeypatch.setattr(cls, "__init__", never)


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_bad_layer_fails_in_one_line_before_the_model_is_built(name, tmp_path, monkeypatch):
    _never_built(monkeypatch, name)
    site, last = LAST_LAYER[name]
    code, out = _extract(tmp_path / "s.zarr", "--model", name, "--layer", 99)
    assert code != 0 and out.count("\n") == 1, out
    assert f"layer 99 is out of range: available layers at site '{site}': {format_indices(range(last + 1))}" in out
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_good_selection_still_runs(name, tmp_path):
    site, last = LAST_LAYER[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the small random model says so
        code, out = _extract(tmp_path / "s.zarr", "--model", name, "--site", site, "--layer", -1)
    assert code == 0, out
    assert np.asarray(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")[f"{site}/layer"][:]).tolist() == [last]


@pytest.mark.parametrize("name", sorted(registry()["model"]))
def test_architecture_is_what_the_built_adapter_has(name):
    """Every registered model adapter (built-in or third-party): the same experts and sites before and after."""
    cls = registry()["model"][name].obj
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        adapter = cls()
    check_architecture(adapter)


def test_options_change_the_architecture_as_they_change_the_model():
    pi0 = registry()["model"]["pi0"].obj
    experts, _ = pi0.architecture(None, num_steps=3, cameras="wrist,agentview")
    assert experts["action"].denoise_steps == 3
    assert experts["vlm"].spans == ("image", "image.wrist", "image.agentview", "text")
    openvla = registry()["model"]["openvla"].obj
    assert openvla.architecture(None, capture="actions")[0]["llm"].record_call == -1
    robovlms = registry()["model"]["robovlms"].obj
    assert robovlms.architecture(None, hand_camera="wrist")[0]["text"].spans[:2] == ("hand_image", "image")
    assert robovlms.architecture(None, hand_camera="none")[0]["text"].spans[0] == "image"


def test_a_pi0_checkpoint_is_sized_from_its_header(tmp_path, monkeypatch):
    """The lerobot layout (no transformers config.json): the sizes come from the safetensors header alone."""
    from test_pi0_checkpoints import load, native_weights, write_checkpoint

    from toolkit.sdk.hf import llama_tokenizer

    ckpt = write_checkpoint(tmp_path / "ckpt", "current", native_weights())
    tok = tmp_path / "tok"
    llama_tokenizer().save_pretrained(tok)
    check_architecture(load(ckpt, tok))
    experts, _ = registry()["model"]["pi0"].obj.architecture(str(ckpt))
    assert [(e.n_layers, e.hidden_size) for e in experts.values()] == [(2, 64), (2, 32)]
    _never_built(monkeypatch, "pi0")
    code, out = _extract(tmp_path / "s.zarr", "--model", "pi0", "--checkpoint", ckpt, "--layer", 2)
    assert code != 0 and "layer 2 is out of range: available layers at site 'vlm': 0,1" in out


def test_an_old_non_zip_robovlms_file_is_checked_once_loaded(tmp_path):
    """Its shapes cannot be read without reading every weight, so architecture() says it does not know."""
    path = tmp_path / "old.pt"
    torch.save({"state_dict": {"model.action_token": torch.zeros(4)}}, path, _use_new_zipfile_serialization=False)
    assert registry()["model"]["robovlms"].obj.architecture(str(path)) is None
