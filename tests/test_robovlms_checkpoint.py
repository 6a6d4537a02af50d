"""RoboVLMs checkpoints as RoboVLMs saves them (a Lightning ``.pt``: ``state_dict`` under ``model.``, the training
``configs`` under ``hyper_parameters``), built tiny here: every tensor loads or the run stops in one line, unused
tensors are reported, the training configuration sets the window, the hand camera, the action chunk and the
action scale unless the user overrides it, and docs/checkpoints.md's command runs on the same layout."""

import json
import logging
import shlex
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_h5 import write_episode

import toolkit
from toolkit.sdk.adapters import Episode, Step
from toolkit.sdk.checkpoint import CheckpointError
from toolkit.cli.main import cli
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.hf import llama_tokenizer
from toolkit.testing import check_model_adapter, full_plan, run_captured
from toolkit_plugins.robovlms import RoboVLMsAdapter
from toolkit_plugins.robovlms.adapter import TINY_KOSMOS
from toolkit_plugins.robovlms.model import RoboKosmosPolicy

pytestmark = pytest.mark.usefixtures("pi0_single_thread")

README = Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md"  # the command users copy
HIDDEN = TINY_KOSMOS["text_config"]["embed_dim"]
HEAD = dict(action_dim=7, latent=1, fwd_pred_next_n=3, head_hidden_size=32, head_layers=2)


def training_configs(**changes):
    """A RoboVLMs training config in the shape of configs/oxe_training/*_oxe_pretrain.json, at tiny sizes."""
    cfg = {
        "robovlm_name": "RoboKosMos", "model": "kosmos", "image_size": 28, "window_size": 3, "fwd_pred_next_n": 3,
        "use_hand_rgb": True, "use_vision_resampler": False, "seed": 123, "batch_size": 4,
        "norm_action": True, "norm_min": -0.65, "norm_max": 0.65,
        "train_setup": {"precision": "bf16", "predict_action": True, "train_vision": True},
        "act_head": {"type": "LSTMDecoder", "hidden_size": 32, "action_dim": 7, "down_sample": "none", "latent": 1,
                     "fwd_pred_next_n": 1, "window_size": 1, "action_space": "continuous", "with_history": True,
                     "history_type": "post", "num_layers": 2},
        "fwd_head": None,
        "tokenizer": {"type": "AutoProcessor", "pretrained_model_name_or_path": ".vlms/kosmos-2-patch14-224",
                      "tokenizer_type": "kosmos", "max_text_len": 256, "additional_special_tokens": None},
        "vlm": {"type": "AutoModelForVision2Seq", "name": "kosmos",
                "pretrained_model_name_or_path": ".vlms/kosmos-2-patch14-224"},
        "trainer": {"strategy": "deepspeed_stage_2", "precision": "16", "max_epochs": 5},
    }
    cfg.update(changes)
    return cfg


def tiny_policy(seed=0):
    from transformers import Kosmos2Config

    torch.manual_seed(seed)
    policy = RoboKosmosPolicy(Kosmos2Config(**TINY_KOSMOS), window_size=3, **HEAD)
    policy.action_token.data.normal_()  # zeros at init: make it a tensor a wrong load would show
    return policy.eval()


def save_lightning(path, policy, configs=None, extra=None, drop=(), hyper=None):
    """What Lightning writes for RoboVLMs' BaseTrainer (its LightningModule holds the policy as ``self.model``)."""
    sd = {f"model.{k}": v.clone() for k, v in policy.state_dict().items() if k not in drop}
    sd.update(extra or {})
    torch.save({"epoch": 4, "global_step": 50000, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
                "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 4}}}},
                "callbacks": {"ModelCheckpoint{'monitor': None}": {"dirpath": "runs/checkpoints", "best_model_score":
                                                                   None}},
                "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
                "hyper_parameters": hyper if hyper is not None else {"configs": configs or training_configs()}}, path)
    return path


def episodes(n_episodes=2, n_steps=4, cameras=("agentview", "wrist")):
    eps = []
    for e in range(n_episodes):
        rng = np.random.default_rng(10 + e)
        steps = [Step(index=k, images={c: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for c in cameras})
                 for k in range(n_steps)]
        eps.append(Episode(key=f"ep_{e}", task=f"task {e}", task_id=e, instruction=["pick up the cup", "go left"][e],
                           n_steps=n_steps, _steps=steps))
    return eps


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("robovlms_ckpt")
    policy = tiny_policy(seed=7)  # not the adapter's seed 0: random weights must differ from these
    llama_tokenizer().save_pretrained(d / "tok")
    save_lightning(d / "policy.pt", policy)
    return {"dir": d, "policy": policy, "ckpt": d / "policy.pt", "tok": str(d / "tok")}


def load(files, path=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return RoboVLMsAdapter(checkpoint=str(path or files["ckpt"]), tokenizer=files["tok"], **kw)


@pytest.fixture(scope="module")
def loaded(files):
    return load(files)


def test_every_tensor_of_a_lightning_checkpoint_is_loaded(files, loaded):
    file_sd = files["policy"].state_dict()
    model_sd = loaded.model.state_dict()
    assert set(model_sd) == set(file_sd)
    for k, v in file_sd.items():
        assert torch.equal(model_sd[k], v), k
    rep = loaded.describe()["load_report"]
    assert rep["n_loaded"] == rep["n_params"] == len(file_sd) and rep["missing"] == [] and rep["unexpected"] == []
    assert rep["layout"] == "RoboVLMs Lightning checkpoint, weights under 'model.'"
    assert loaded.describe()["random_init"] is False


def test_hyper_parameters_set_window_hand_camera_chunk_and_action_scale(loaded):
    d = loaded.describe()
    assert (d["window"], d["chunk"]) == (3, 3)
    src = "checkpoint hyper_parameters"
    assert d["settings"]["window"] == {"value": 3, "from": src}
    assert d["settings"]["fwd_pred_next_n"] == {"value": 3, "from": "checkpoint tensors"}
    assert d["settings"]["unnormalise_actions"] == {"value": [-0.65, 0.65], "from": src}
    eps = episodes()
    batch = [(ep, s) for ep in eps for s in ep.steps()]
    inputs = loaded.prepare(batch)
    assert loaded.hand_camera == "wrist" and loaded.camera == "agentview"
    assert loaded.describe()["settings"]["hand_camera"] == {"value": "wrist", "from": f"{src} (use_hand_rgb=true)"}
    q = TINY_KOSMOS["latent_query_num"]
    assert inputs.spans["text"]["hand_image"] == list(range(1, 1 + q))  # RoboVLMs puts the hand latents first
    assert inputs.spans["text"]["image"] == list(range(1 + q, 1 + 2 * q))
    assert inputs.tensors["pixel_values"].shape == (8, 2, 3, 28, 28)
    out, arrays = run_captured(loaded, inputs, full_plan(loaded))
    assert arrays["context/context"].shape == (8, 1, 3, HIDDEN)  # a 3-frame window
    assert out.actions.shape == (8, 3, 7)  # a 3-step action chunk
    # the arm actions are the head's tanh outputs mapped to [norm_min, norm_max], as RoboVLMs' evaluation does
    ctx = torch.from_numpy(arrays["context/context"][:, 0])[:, :, None]
    with torch.no_grad():
        raw, _ = loaded.model.act_head(ctx, valid=inputs.tensors["valid"])
    np.testing.assert_allclose(out.actions[..., :6], 0.5 * (raw[:, -1].numpy() + 1) * 1.3 - 0.65, atol=1e-6)
    assert np.abs(out.actions[..., :6]).max() <= 0.65
    # the hand image reaches the model: another wrist image at the last step changes that sample's context only
    _, before = run_captured(loaded, loaded.prepare(batch[3:4]), full_plan(loaded))
    last = eps[0]._steps[-1]
    last.images["wrist"] = 255 - last.images["wrist"]
    _, after = run_captured(loaded, loaded.prepare(batch[3:4]), full_plan(loaded))
    before, after = before["context/context"][0, 0], after["context/context"][0, 0]
    assert np.abs(after[-1] - before[-1]).max() > 1e-5
    np.testing.assert_array_equal(after[:2], before[:2])


def test_conformance_with_window_and_hand_camera(loaded):
    batch = [(ep, s) for ep in episodes(2, 3) for s in ep.steps()]
    check_model_adapter(loaded, batch)  # hooks change nothing, residuals equal transformers' hidden states, ...


def test_user_options_override_the_training_config(files):
    a = load(files, window=1, hand_camera="none")
    d = a.describe()["settings"]
    assert d["window"] == {"value": 1, "from": "user option"}
    assert d["hand_camera"] == {"value": None, "from": "user option"}
    batch = [(ep, s) for ep in episodes(1, 2) for s in ep.steps()]
    inputs = a.prepare(batch)
    assert inputs.tensors["pixel_values"].shape == (2, 1, 3, 28, 28) and "hand_image" not in inputs.spans["text"]
    _, arrays = run_captured(a, inputs, full_plan(a))
    assert arrays["context/context"].shape == (2, 1, 1, HIDDEN)


def test_a_config_file_wins_and_must_describe_these_weights(files, tmp_path):
    cfg = tmp_path / "kosmos_ph_oxe-pretrain.json"
    cfg.write_text(json.dumps(training_configs(window_size=2, use_hand_rgb=False)))
    a = load(files, config=str(cfg))
    assert a.describe()["settings"]["window"] == {"value": 2, "from": "config file kosmos_ph_oxe-pretrain.json"}
    assert a.hand_camera is None
    cfg.write_text(json.dumps(training_configs(fwd_pred_next_n=10)))
    with pytest.raises(CheckpointError, match=r"says fwd_pred_next_n=10, but the weights are shaped for 3") as err:
        load(files, config=str(cfg))
    assert "\n" not in str(err.value)
    cfg.write_text(json.dumps(training_configs(model="paligemma", robovlm_name="RoboPaligemma")))
    with pytest.raises(CheckpointError, match="trained with backbone 'paligemma'; the robovlms adapter runs the "
                                              "Kosmos-2 RoboVLMs policy"):
        load(files, config=str(cfg))
    head = training_configs()["act_head"] | {"history_type": "pre"}
    cfg.write_text(json.dumps(training_configs(act_head=head)))
    with pytest.raises(CheckpointError, match="act_head history_type is 'pre'"):
        load(files, config=str(cfg))


def test_the_real_kosmos_policy_is_shaped_from_its_tensors(tmp_path):
    """At real size (on the meta device: shapes only): the OXE-pretrain policy's tensors give Kosmos-2's own
    config back, and its training config agrees with them."""
    from transformers import Kosmos2Config

    from toolkit_plugins.robovlms.loading import TrainingConfig, check_shapes_agree, shapes_from_state_dict

    real = Kosmos2Config()
    with torch.device("meta"):
        policy = RoboKosmosPolicy(real, window_size=16, action_dim=7, latent=1, fwd_pred_next_n=10,
                                  head_hidden_size=1024, head_layers=4)
    cfg, head = shapes_from_state_dict(policy.state_dict(), tmp_path / "kosmos_ph_oxe-pretrain.pt")
    assert head == dict(action_dim=7, latent=1, fwd_pred_next_n=10, head_hidden_size=1024, head_layers=4)
    for part in ("text_config", "vision_config"):
        got, want = getattr(cfg, part).to_dict(), getattr(real, part).to_dict()
        assert {k: got[k] for k in want if got[k] != want[k]} == {}, part
    assert cfg.latent_query_num == real.latent_query_num == 64
    oxe = training_configs(image_size=224, window_size=16, fwd_pred_next_n=10)
    oxe["act_head"] = oxe["act_head"] | {"hidden_size": 1024, "num_layers": 4}
    check_shapes_agree(TrainingConfig(oxe, "test"), cfg, head, tmp_path)
    assert sum(p.numel() for p in policy.parameters()) == 1_705_698_374  # docs/checkpoints.md's 1.71 B


def test_a_bare_state_dict_runs_with_defaults_and_says_so(files, tmp_path, caplog):
    path = tmp_path / "bare.pt"
    torch.save({"model_state_dict": files["policy"].state_dict()}, path)
    with caplog.at_level(logging.WARNING, logger="toolkit.robovlms"):
        a = load(files, path)
    assert a.describe()["load_report"]["layout"] == "RoboVLMs model_state_dict checkpoint, weights under '(no prefix)'"
    assert a.describe()["load_report"]["n_missing"] == 0 and a.window == 1
    assert any("holds no RoboVLMs training config (hyper_parameters)" in r.getMessage() and "config=FILE" in
               r.getMessage() for r in caplog.records)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(training_configs()))
    assert load(files, path, config=str(cfg)).window == 3


def test_tensors_the_policy_does_not_use_are_reported(files, tmp_path, caplog):
    extra = {"model.fwd_head.decoder.weight": torch.ones(2, 2),  # a head this adapter does not build
             "model_ema.action_token": torch.ones(HIDDEN),  # an EMA copy beside the policy
             "model_ema.act_head.rnn.weight_ih_l0": torch.ones(3)}
    path = save_lightning(tmp_path / "extra.pt", files["policy"], extra=extra)
    with caplog.at_level(logging.WARNING):
        a = load(files, path)
    rep = a.describe()["load_report"]
    assert rep["n_unexpected"] == 3 and rep["unexpected"] == sorted(extra) and rep["missing"] == []
    # one warning (not one from the loader and another from the adapter), by the names in the file, with a count
    lines = [r.getMessage() for r in caplog.records if "not used by the model" in r.getMessage()]
    assert len(lines) == 1 and f"{path}: 3 checkpoint tensors are not used by the model" in lines[0], lines
    assert "first: " + ", ".join(sorted(extra)) in lines[0] and "--strict refuses them" in lines[0]
    for k, v in files["policy"].state_dict().items():  # the policy's own copy is the one loaded
        assert torch.equal(a.model.state_dict()[k], v), k


def test_strict_refuses_unused_tensors_in_one_cli_line(files, tmp_path):
    extra = {"model.backbone.text_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, HIDDEN),
             "model.backbone.text_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(HIDDEN, 4)}
    path = save_lightning(tmp_path / "lora.pt", files["policy"], extra=extra)
    store = tmp_path / "s.zarr"
    args = ["extract", "--model", "robovlms", "--checkpoint", str(path), "--model-option", f"tokenizer={files['tok']}",
            "--dataset", "libero", "--max-episodes", "1", "--max-steps", "1", "--store", str(store), "--strict"]
    res = CliRunner().invoke(cli, args)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code != 0 and not store.exists() and len(lines) == 1, res.output
    assert "2 checkpoint tensors are not used by the model" in lines[0] and "refused (--strict)" in lines[0]
    assert "lora_A.weight" in lines[0] and "lora_B.weight" in lines[0]


def test_a_dropped_weight_is_one_cli_line_and_allow_missing_records_it(files, tmp_path):
    key = "act_head.rnn.weight_hh_l1"
    path = save_lightning(tmp_path / "dropped.pt", files["policy"], drop=(key,))
    store = tmp_path / "s.zarr"
    args = ["extract", "--model", "robovlms", "--checkpoint", str(path), "--model-option", f"tokenizer={files['tok']}",
            "--dataset", "libero", "--max-episodes", "1", "--max-steps", "2", "--store", str(store)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0 and not store.exists()
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"first missing: {key}; pass --allow-missing" in lines[0], res.output
    res = CliRunner().invoke(cli, args + ["--allow-missing"])
    assert res.exit_code == 0, res.output
    model = toolkit.open_store(store).attrs["model"]
    assert model["load_report"]["missing"] == [key] and model["load_report"]["n_missing"] == 1
    assert model["settings"]["window"]["value"] == 3 and model["hand_camera"] == "wrist"
    # the missing weight keeps the seeded random value a --random-weights run gives it, the others are the file's
    kept, rand = load(files, path, allow_missing=True).model.state_dict(), load(files, random_weights=True).model
    assert torch.equal(kept[key], rand.state_dict()[key])
    assert torch.equal(kept["action_token"], files["policy"].action_token)


def test_the_tokenizer_is_found_or_named(files, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = save_lightning(tmp_path / "policy.pt", files["policy"])
    with pytest.raises(ToolkitError, match=r"^no Kosmos-2 tokenizer \(microsoft/kosmos-2-patch14-224 cannot be "
                                           r"loaded\): download the Kosmos-2 processor files, `hf download "
                                           r"microsoft/kosmos-2-patch14-224 sentencepiece.bpe.model") as err:
        RoboVLMsAdapter(checkpoint=str(path))
    assert "\n" not in str(err.value) and "--model-option tokenizer=" in str(err.value)
    # where the training config says it is (RoboVLMs' .vlms/ folder), beside the checkpoint
    llama_tokenizer().save_pretrained(tmp_path / ".vlms" / "kosmos-2-patch14-224")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = RoboVLMsAdapter(checkpoint=str(path))
    assert a.describe()["settings"]["tokenizer"] == {"value": str(tmp_path / ".vlms" / "kosmos-2-patch14-224"),
                                                     "from": "checkpoint hyper_parameters"}


def test_random_weights_keep_the_checkpoints_architecture(files):
    a, b = load(files, random_weights=True), load(files, random_weights=True)
    file_sd, a_sd = files["policy"].state_dict(), a.model.state_dict()
    assert {k: v.shape for k, v in a_sd.items()} == {k: v.shape for k, v in file_sd.items()}
    assert not torch.equal(a_sd["act_head.rnn.weight_ih_l0"], file_sd["act_head.rnn.weight_ih_l0"])
    assert not torch.equal(a_sd["action_token"], file_sd["action_token"])
    for k, v in a_sd.items():  # seeded
        assert torch.equal(v, b.model.state_dict()[k]), k
    d = a.describe()
    assert d["random_init"] is True and d["load_report"] is None and (d["window"], d["chunk"]) == (3, 3)


def _fake_module(monkeypatch, dotted, **attrs):
    """Register ``dotted`` (and its parents) in sys.modules, so a test can pickle a class that claims to live
    there, as Lightning's would; monkeypatch removes them again, so loading cannot import them."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    mod = sys.modules[dotted]
    for name, cls in attrs.items():
        cls.__module__, cls.__qualname__ = dotted, name
        setattr(mod, name, cls)
    return mod


def test_lightning_objects_in_the_file_are_read_as_data_or_stood_in_for(files, tmp_path, caplog):
    class AttributeDict(dict):
        pass

    class Scheduler:
        def __init__(self):
            self.steps = torch.arange(3)

    with pytest.MonkeyPatch.context() as mp:
        _fake_module(mp, "lightning.fabric.utilities.data", AttributeDict=AttributeDict)
        _fake_module(mp, "somelib.sched", Scheduler=Scheduler)
        hyper = AttributeDict(configs=training_configs(window_size=2))
        a_path = save_lightning(tmp_path / "attrdict.pt", files["policy"], hyper=hyper)
        bad = training_configs()
        bad["window_size"] = Scheduler()  # a config value that is not plain data
        b_path = save_lightning(tmp_path / "object.pt", files["policy"], hyper={"configs": bad})
    assert "somelib.sched" not in sys.modules
    a = load(files, a_path)
    assert a.describe()["settings"]["window"] == {"value": 2, "from": "checkpoint hyper_parameters"}
    with caplog.at_level(logging.WARNING, logger="toolkit.robovlms"):
        b = load(files, b_path)
    assert b.window == 1 and b.describe()["settings"]["window"]["from"] == "default"
    assert "use_hand_rgb=true" in b.describe()["settings"]["hand_camera"]["from"]  # the rest is still used
    msgs = [r.getMessage() for r in caplog.records]
    assert any("training-config values not read" in m and "window_size=<unread somelib.sched.Scheduler object>"
               in m for m in msgs), msgs
    for k, v in files["policy"].state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k


class _Payload:
    """Unpickling this with plain pickle calls ``func(marker)``."""

    def __init__(self, func, marker):
        self.func, self.marker = func, marker

    def __reduce__(self):
        return self.func, (str(self.marker),)


def test_code_named_in_the_file_never_runs(files, tmp_path):
    def touch(marker):
        Path(marker).touch()

    sd = {f"model.{k}": v for k, v in files["policy"].state_dict().items()}
    with pytest.MonkeyPatch.context() as mp:
        _fake_module(mp, "somelib.hooks", touch=touch)  # importable while loading: plain pickle would call it
        path = tmp_path / "hook.pt"
        torch.save({"state_dict": sd, "callbacks": {"Hook": _Payload(touch, tmp_path / "ran")},
                    "hyper_parameters": {"configs": training_configs()}}, path)
        a = load(files, path)
    assert not (tmp_path / "ran").exists() and a.window == 3 and a.describe()["load_report"]["n_missing"] == 0
    import os

    path = tmp_path / "shell.pt"
    torch.save({"state_dict": sd, "callbacks": {"Shell": _Payload(os.system, f"touch {tmp_path / 'shell'}")}}, path)
    refused = r"shell.pt \(Trying to load unsupported GLOBAL (posix|nt)\.system whose module (posix|nt) is blocked"
    with pytest.raises(CheckpointError, match=r"cannot read RoboVLMs checkpoint .*" + refused):
        load(files, path)
    assert not (tmp_path / "shell").exists()


def test_a_pickled_dict_subclass_in_the_config_is_one_line_naming_it(files, tmp_path):
    """A config held in a dict subclass (EasyDict-style, here collections.defaultdict and a library's own class)
    cannot be built without running its code: one line naming the class and what to do, no torch traceback."""
    import collections

    class EasyConfig(dict):
        pass

    with pytest.MonkeyPatch.context() as mp:
        _fake_module(mp, "somelib.config", EasyConfig=EasyConfig)
        a = save_lightning(tmp_path / "easy.pt", files["policy"], hyper={"configs": EasyConfig(training_configs())})
    b = save_lightning(tmp_path / "dd.pt", files["policy"],
                       configs=training_configs(extra=collections.defaultdict(list, k=[1])))
    for path, name in ((a, "somelib.config.EasyConfig"), (b, "collections.defaultdict")):
        args = ["extract", "--model", "robovlms", "--checkpoint", str(path), "--model-option",
                f"tokenizer={files['tok']}", "--dataset", "libero", "--max-episodes", "1", "--store",
                str(tmp_path / "s.zarr")]
        res = CliRunner().invoke(cli, args)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code != 0 and len(lines) == 1 and "Traceback" not in res.output, res.output
        assert f"cannot read RoboVLMs checkpoint {path}: it pickles a {name} object" in lines[0]
        assert "re-save it" in lines[0] and "--model-option config=FILE" in lines[0]
        assert "weights_only` set to `False`" not in lines[0]  # not torch's advice to run the file's code
    assert not (tmp_path / "s.zarr").exists()


def readme_command(model):
    """docs/checkpoints.md's `toolkit extract --model MODEL ...` command, continuation lines joined."""
    text = README.read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(f"toolkit extract --model {model} ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("#")[0])


def test_readme_robovlms_command_runs_on_the_same_layout(files, tmp_path, monkeypatch):
    args = readme_command("robovlms")
    opts = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--model-option")
    ckpt, data, store = (args[args.index(f) + 1] for f in ("--checkpoint", "--data", "--store"))
    monkeypatch.chdir(tmp_path)
    save_lightning(tmp_path / ckpt, files["policy"])
    llama_tokenizer().save_pretrained(tmp_path / opts["tokenizer"])
    (tmp_path / data).mkdir()
    for i, side in enumerate(["left", "right", "left"]):
        write_episode(tmp_path / data / f"episode_20250101_12000{i}_1box_vert_{side}.h5", n=6, size=(24, 32),
                      instruction=f"go {side}", seed=i)
    res = CliRunner().invoke(cli, args[1:])
    assert res.exit_code == 0, res.output
    s = toolkit.open_store(tmp_path / store)
    model = s.attrs["model"]
    assert model["random_init"] is False and model["load_report"]["n_missing"] == 0
    assert model["window"] == 3 and model["hand_camera"] is None  # Mobile-VLA has no wrist camera
    assert s.read("context", "context").shape[1:] == (1, 3, HIDDEN)
    assert s.coord("policy_action").shape[1:] == (3, 7)
