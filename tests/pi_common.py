"""What the pi0 and pi0.5 tests share (tests/test_pi0*.py, tests/test_pi05.py): an adapter built without its
warnings (the random-weights notice, a checkpoint's missing statistics), one loaded from a checkpoint with the local
tokenizer (the ``tokenizer_dir`` fixture, in conftest.py), a dataset of LIBERO-like camera episodes, the CLI run
in this process, and the parts of a tiny checkpoint directory both models' layouts have: the toy-width
architecture, the dataset statistics, openpi's ``norm_stats.json`` and lerobot's processor files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from safetensors.numpy import save_file as save_numpy

import pytest

from synthetic import camera_episodes, dataset_registered
from toolkit.sdk.adapters import DatasetAdapter

# the real pi0 / pi0.5 head layout (one KV head; SigLIP So400m has 16 heads) at toy widths
SMALL_EXPERTS = dict(
    vlm_config=dict(
        model_type="paligemma",
        text_config=dict(model_type="gemma", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                         num_attention_heads=8, num_key_value_heads=1, head_dim=8, vocab_size=32001),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=16, patch_size=14, image_size=28, vision_use_head=False),
        projection_dim=64, image_token_id=32001),
    dit_config=dict(model_type="gemma", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                    num_attention_heads=8, num_key_value_heads=1, head_dim=8),
    chunk_size=50, max_action_dim=32, num_inference_steps=10,
)
STATE_DIM, ACTION_DIM = 8, 7
FEATURES = {"observation.state": {"type": "STATE", "shape": [STATE_DIM]},
            "action": {"type": "ACTION", "shape": [ACTION_DIM]}}
NORMALISER = "normalizer_processor"  # where ``write_lerobot_processors`` puts the normaliser step


def small_model(model_class: str, config: dict, seed: int):
    """transformers' ``model_class`` (PI0ForConditionalGeneration, PI05...) built from ``config``, seeded."""
    import torch
    import transformers

    cls = getattr(transformers, model_class)
    torch.manual_seed(seed)
    return cls(cls.config_class(**config))


def save_pretrained(model_class: str, config: dict, weights: dict, path: Path) -> Path:
    """``weights`` as transformers' own ``save_pretrained`` of ``model_class`` writes them (the hub layout)."""
    m = small_model(model_class, config, 0)
    m.load_state_dict(weights)
    m.save_pretrained(path)
    return path


def assert_every_weight_loaded(adapter, weights: dict) -> None:
    """The adapter's model holds exactly ``weights``, none missing."""
    import torch

    assert adapter.load_report.missing == []
    for n, t in adapter.model.state_dict().items():
        assert torch.equal(t, weights[n]), n


def assert_loaded_from_file(adapter, ckpt: Path, weights: dict, key, derived=()) -> dict:
    """Every model tensor equals the file's tensor at its upstream key (``key(name)``), but the ``derived`` ones
    (never used by the forward: zeros); the file's tensors."""
    import torch
    from safetensors.torch import load_file

    file = load_file(str(ckpt / "model.safetensors"))
    params = adapter.model.state_dict()
    assert set(params) == set(weights)
    for n in weights:
        if n in derived:
            assert not params[n].any(), n
        else:
            torch.testing.assert_close(params[n], file[key(n)], rtol=0, atol=0)
    return file


def assert_small_architecture(adapter) -> None:
    """The architecture came from the weights (and config.json): SMALL_EXPERTS' sizes, the real head layout."""
    text = adapter.model.config.vlm_config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.head_dim) == (2, 64, 8, 8)
    assert adapter.model.config.dit_config.hidden_size == 32 and adapter.image_size == 28
    assert adapter.chunk_size == 50


def stat_arrays(dim: int, seed: int) -> dict[str, np.ndarray]:
    """Dataset statistics of one feature, every kind lerobot and openpi keep (mean/std, min/max, quantiles)."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim).astype(np.float32)
    std = rng.uniform(0.5, 2.0, size=dim).astype(np.float32)
    return {"mean": mean, "std": std, "min": mean - 3 * std, "max": mean + 3 * std,
            "q01": mean - 2 * std, "q99": mean + 2 * std}


STATE_STATS, ACTION_STATS = stat_arrays(STATE_DIM, 1), stat_arrays(ACTION_DIM, 2)


# the config.json openpi's converter writes
OPENPI_CONFIG = {"action_dim": 32, "action_horizon": 50, "paligemma_variant": "gemma_2b",
                 "action_expert_variant": "gemma_300m", "precision": "float32"}


def write_openpi_files(d: Path, config: dict | None = None) -> None:
    """What openpi's converter writes beside the weights: its config.json (``config``, else OPENPI_CONFIG) and the
    training assets, ``assets/<asset id>/norm_stats.json`` with STATE_STATS and ACTION_STATS."""
    (d / "config.json").write_text(json.dumps(config or OPENPI_CONFIG))
    assets = d / "assets" / "physical-intelligence" / "libero"
    assets.mkdir(parents=True)
    (assets / "norm_stats.json").write_text(json.dumps({"norm_stats": {
        "state": {k: STATE_STATS[k].tolist() for k in ("mean", "std", "q01", "q99")},
        "actions": {k: ACTION_STATS[k].tolist() for k in ("mean", "std", "q01", "q99")}}}))


def write_lerobot_processors(d: Path, norm_map: dict[str, str], pre_steps: list, post_steps: list) -> None:
    """lerobot's policy_preprocessor.json (``pre_steps``, the normaliser step where ``NORMALISER`` stands) and
    policy_postprocessor.json (the unnormaliser, then ``post_steps``), with their normaliser step files holding
    STATE_STATS and ACTION_STATS."""
    norm_cfg = {"eps": 1e-8, "features": FEATURES, "norm_map": norm_map}
    pre = f"policy_preprocessor_step_{pre_steps.index(NORMALISER)}_normalizer_processor.safetensors"
    post = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    save_numpy({**{f"observation.state.{k}": v for k, v in STATE_STATS.items()},
                **{f"action.{k}": v for k, v in ACTION_STATS.items()}}, str(d / pre))
    save_numpy({f"action.{k}": v for k, v in ACTION_STATS.items()}, str(d / post))
    steps = [{"registry_name": NORMALISER, "config": norm_cfg, "state_file": pre} if s == NORMALISER else s
             for s in pre_steps]
    (d / "policy_preprocessor.json").write_text(json.dumps({"name": "policy_preprocessor", "steps": steps}))
    (d / "policy_postprocessor.json").write_text(json.dumps({"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": {"eps": 1e-8, "features": {"action": FEATURES["action"]},
                                                               "norm_map": norm_map}, "state_file": post},
        *post_steps]}))


def tokenizer_step(max_length: int) -> dict:
    """lerobot's tokenizer step (PaliGemma's tokenizer, padded to ``max_length``)."""
    return {"registry_name": "tokenizer_processor", "config": {"max_length": max_length, "padding_side": "right",
                                                               "padding": "max_length",
                                                               "tokenizer_name": "google/paligemma-3b-pt-224"}}


def quiet(make, *args, **kw):
    """``make(*args, **kw)`` with its UserWarnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return make(*args, **kw)


def load(adapter: type, ckpt, tokenizer_dir, **kw):
    """``adapter`` (Pi0Adapter, Pi05Adapter) on the checkpoint ``ckpt`` with the tokenizer in ``tokenizer_dir``."""
    return quiet(adapter, checkpoint=str(ckpt), tokenizer=str(tokenizer_dir), **kw)


def extract(model: str, store, dataset, **kw):
    """``toolkit.extract`` of ``model`` on ``dataset`` into ``store``, quietly."""
    import toolkit

    return quiet(toolkit.extract, model=model, dataset=dataset, store=store, **kw)


def toolkit_cli(*args):
    """`toolkit ARGS` in this process (the same click group and one-line error handling as the console script)."""
    from click.testing import CliRunner

    from toolkit.cli.main import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    return SimpleNamespace(returncode=res.exit_code, stderr=res.stderr, output=res.output)


def assert_resid_post_is_hidden_states(adapter, batch, got) -> None:
    """The captured VLM layer outputs ``got`` (sample, layer, token, feature) of ``batch`` equal transformers' own
    hidden states over the prefix (the last layer's through the final norm, as transformers 5.x returns it)."""
    import torch

    t, model = adapter.prepare(batch).tensors, adapter.model.model
    got = torch.from_numpy(got)
    with torch.no_grad():
        emb = model.embed_prefix(t["input_ids"], t["pixel_values"], t["pixel_attention_mask"])
        hs = model.vlm(inputs_embeds=emb, attention_mask=t["attention_mask"],
                       position_ids=t["attention_mask"].cumsum(-1) - 1, token_type_ids=torch.zeros_like(emb)[:, :, 0],
                       output_hidden_states=True).hidden_states
        assert len(hs) == got.shape[1] + 1
        for layer in range(got.shape[1] - 1):
            torch.testing.assert_close(got[:, layer], hs[layer + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.vlm.language_model.norm(got[:, -1]), hs[-1], atol=1e-5, rtol=1e-5)


def camera_dataset(dataset_name: str, instructions: list[str]):
    """A module fixture: the name of a dataset registered as ``dataset_name`` while the module runs, two episodes of
    two LIBERO-like steps (agentview + wrist cameras, 8-dim state) with ``instructions``."""

    class CameraSteps(DatasetAdapter):
        name = dataset_name

        def episodes(self):
            yield from camera_episodes(instructions)

    @pytest.fixture(scope="module")
    def dataset():
        with dataset_registered(CameraSteps) as registered:
            yield registered

    return dataset


def first_steps(instructions: list[str], n: int = 3) -> list:
    """The first ``n`` (episode, step) pairs of ``camera_episodes(instructions)``: a batch."""
    return [(ep, step) for ep in camera_episodes(instructions) for step in ep.steps()][:n]
