"""Conformance checks for model adapters, for plugin authors' test suites.

    from toolkit.testing import check_model_adapter
    def test_my_adapter():
        check_model_adapter(MyAdapter(), [(episode, step), ...])

Each check raises ``AssertionError`` (or the adapter's own error) with a message saying what is wrong:

* ``check_architecture``: what the adapter's ``architecture()`` says (when it says anything) is what the built
  adapter has: the same sites, and the same experts, except spans the adapter learns from its first batch;
* ``check_structure``: every site names an existing expert, every expert's ``layers_path`` is a ModuleList of
  ``n_layers`` layers, spans/masks/sequence lengths of prepared inputs are consistent;
* ``check_outputs_unchanged``: ``run`` gives bit-identical actions with and without a capture of every
  site and stream (and is deterministic for fixed generators);
* ``check_hooks_removed``: no hook is left behind when an exception is raised inside ``with Capture(...)``;
* ``check_reference_hidden_states``: the adapter's
  ``reference_hidden_states(inputs, generators) -> {expert: (B, n_layers, [denoise,] seq, hidden)}`` (each
  layer's output as the model itself reports it) equals the captured ``resid_post``.  It is part of the
  contract: without it this check is *skipped loudly* (a pytest skip naming the reason, or a warning outside
  pytest), after every other check has passed.

docs/plugins.md walks through the contract and a complete plugin.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from toolkit.sdk.adapters import Episode, ModelAdapter, ModelInputs, SiteInfo, Step
from toolkit.capture.hooks import Capture, resolve_module
from toolkit.capture.plan import SiteCapture, build_plan

Batch = Sequence[tuple[Episode, Step]]


def generators(n: int, seed: int = 0) -> list[torch.Generator]:
    """Fresh per-sample CPU generators, as ``toolkit.run.pipeline`` hands them to ``run``."""
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def full_plan(adapter: ModelAdapter, pool: str = "none", dtype: str = "float32") -> list[SiteCapture]:
    """Every site, every layer, every stream."""
    return build_plan(adapter.name, adapter.experts, adapter.sites, streams="all", pool=pool, dtype=dtype)


def count_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def run_captured(adapter: ModelAdapter, inputs: ModelInputs, plan: list[SiteCapture], seed: int = 0):
    """(policy output, captured arrays) of one hooked policy call."""
    with torch.inference_mode(), Capture(adapter, plan) as cap:
        cap.begin(inputs)
        out = adapter.run(inputs, generators(inputs.batch_size, seed))
        arrays = cap.collect()
    return out, arrays


def check_architecture(adapter: ModelAdapter) -> None:
    """``architecture(checkpoint, **options)`` (known before the model is built, so `toolkit extract` checks a
    selection early) must describe the built adapter; None (unknown until loaded) passes."""
    arch = type(adapter).architecture(adapter.checkpoint, **adapter.options)
    if arch is None:
        return
    experts, sites = arch
    assert sites == adapter.sites, f"architecture() gives sites {sites}, the built adapter {adapter.sites}"
    built = adapter.experts
    assert list(experts) == list(built), \
        f"architecture() gives experts {list(experts)}, the built adapter {list(built)}"
    for name, ex in experts.items():
        # spans may grow once the first batch names the cameras (pi0's image.CAM, RoboVLMs' found hand camera)
        assert set(ex.spans) <= set(built[name].spans), \
            f"expert {name!r}: architecture() offers spans {ex.spans}, the built adapter {built[name].spans}"
        assert dataclasses.replace(ex, spans=built[name].spans) == built[name], \
            f"expert {name!r}: architecture() gives {ex}, the built adapter {built[name]}"


def check_structure(adapter: ModelAdapter, inputs: ModelInputs) -> None:
    experts = adapter.experts
    for name, site in adapter.sites.items():
        assert isinstance(site, SiteInfo) and site.name == name, f"site {name!r}: SiteInfo.name is {site.name!r}"
        assert site.expert in experts, f"site {name!r} names expert {site.expert!r}; experts: {list(experts)}"
    for name, ex in experts.items():
        assert ex.name == name, f"expert {name!r}: Expert.name is {ex.name!r}"
        layers = resolve_module(adapter.module, ex.layers_path)
        if ex.layered:
            assert isinstance(layers, torch.nn.ModuleList), \
                f"{ex.layers_path} is a {type(layers).__name__}, not a ModuleList"
            assert len(layers) == ex.n_layers, \
                f"expert {name!r}: n_layers={ex.n_layers} but {ex.layers_path} has {len(layers)}"
        else:
            assert ex.n_layers == 1, f"expert {name!r} is a single module ({ex.layers_path}) but n_layers={ex.n_layers}"
        assert name in inputs.seq_len, f"prepare() gives no seq_len for expert {name!r}"
        seq = inputs.seq_len[name]
        spans = inputs.spans.get(name, {})
        missing = set(ex.spans) - set(spans)
        assert not missing, f"expert {name!r} offers spans {sorted(missing)} that prepare() does not give"
        for span, pos in spans.items():
            assert all(0 <= p < seq for p in pos), f"span {name}.{span} has positions outside 0-{seq - 1}"
        mask = inputs.token_mask.get(name)
        if mask is not None:
            assert tuple(mask.shape) == (inputs.batch_size, seq) and mask.dtype == torch.bool, \
                f"token_mask[{name!r}] is {tuple(mask.shape)} {mask.dtype}, expected ({inputs.batch_size}, {seq}) bool"


def check_outputs_unchanged(adapter: ModelAdapter, inputs: ModelInputs) -> None:
    with torch.inference_mode():
        a = adapter.run(inputs, generators(inputs.batch_size))
        b = adapter.run(inputs, generators(inputs.batch_size))
    assert torch.equal(torch.as_tensor(a.actions), torch.as_tensor(b.actions)), \
        "run() is not deterministic for the same generators"
    plan = full_plan(adapter)
    c, arrays = run_captured(adapter, inputs, plan)
    assert torch.equal(torch.as_tensor(a.actions), torch.as_tensor(c.actions)), "capturing changed the policy's actions"
    assert np.asarray(a.actions).shape[0] == inputs.batch_size, "actions' first dim is not the batch"
    for sc in plan:
        ex = adapter.experts[sc.expert]
        for stream in sc.streams:
            arr = arrays[f"{sc.site}/{stream}"]
            lead = (inputs.batch_size, len(sc.layers), *((ex.denoise_steps,) if ex.denoise_steps else ()))
            assert arr.shape[: len(lead)] == lead, f"{sc.site}/{stream} has shape {arr.shape}, expected {lead} + (token, feature)"
    if any(ex.denoise_steps for ex in adapter.experts.values()):
        assert c.denoise_t is not None and len(c.denoise_t) == max(ex.denoise_steps or 0 for ex in adapter.experts.values()), \
            "an expert has denoise_steps but run() gives no matching denoise_t"


class _Boom(Exception):
    pass


def check_hooks_removed(adapter: ModelAdapter, inputs: ModelInputs) -> None:
    before = count_hooks(adapter.module)
    try:
        with torch.inference_mode(), Capture(adapter, full_plan(adapter)) as cap:
            assert count_hooks(adapter.module) > before, "Capture registered no hooks"
            cap.begin(inputs)
            adapter.run(inputs, generators(inputs.batch_size))
            raise _Boom
    except _Boom:
        pass
    assert count_hooks(adapter.module) == before, "hooks were left behind after an exception inside Capture"


def check_reference_hidden_states(adapter: ModelAdapter, inputs: ModelInputs, atol: float = 1e-5,
                                  rtol: float = 1e-5) -> None:
    ref_fn = getattr(adapter, "reference_hidden_states", None)
    if ref_fn is None:
        _skip(f"{adapter.name}: the captured values were NOT compared with the model's own hidden states, because "
              "the adapter has no reference_hidden_states(inputs, generators) -> {expert: (B, n_layers, "
              "[denoise,] seq, hidden)}; implement it (docs/plugins.md)")
        return
    with torch.inference_mode():
        refs = ref_fn(inputs, generators(inputs.batch_size))
    assert refs, "reference_hidden_states() returned nothing"
    for expert, ref in refs.items():
        site = f"_reference_{expert}"
        plan = build_plan(adapter.name, adapter.experts, {site: SiteInfo(site, expert, "all", "none")},
                          streams="resid_post", pool="none", dtype="float32")
        _, arrays = run_captured(adapter, inputs, plan)
        got = torch.from_numpy(arrays[f"{site}/resid_post"])
        torch.testing.assert_close(got, ref.detach().float().cpu(), atol=atol, rtol=rtol,
                                   msg=lambda m, e=expert: f"captured {e} resid_post != reference_hidden_states: {m}")


def _skip(reason: str) -> None:
    """A loud skip: pytest reports it with the reason; outside pytest it is a warning."""
    if "pytest" in sys.modules:
        import pytest

        pytest.skip(reason)
    warnings.warn(reason, stacklevel=3)


def check_model_adapter(adapter: ModelAdapter, batch: Batch, atol: float = 1e-5) -> None:
    """Run every conformance check on ``adapter`` with the dataset steps in ``batch`` (the reference check last:
    without ``reference_hidden_states`` it skips loudly once the others have passed)."""
    check_architecture(adapter)
    inputs = adapter.prepare(batch)
    assert inputs.batch_size == len(batch), f"prepare() gives batch_size {inputs.batch_size} for {len(batch)} steps"
    check_structure(adapter, inputs)
    check_outputs_unchanged(adapter, inputs)
    check_hooks_removed(adapter, inputs)
    check_reference_hidden_states(adapter, inputs, atol=atol)


def check_dataset_adapter(dataset, max_episodes: int = 3) -> None:
    """A dataset adapter yields a deterministic order of uniquely keyed episodes with well-formed steps."""
    import itertools

    def listing():
        out = []
        for ep in itertools.islice(dataset.episodes(), max_episodes):
            out.append((ep.key, [s.index for s in ep.steps()]))
        return out

    first = listing()
    assert first, f"{dataset.name}: no episodes"
    assert listing() == first, f"{dataset.name}: episodes/steps differ between two iterations (order must be fixed)"
    keys = [k for k, _ in first]
    assert len(set(keys)) == len(keys), f"{dataset.name}: episode keys are not unique: {keys}"
    for ep in itertools.islice(dataset.episodes(), max_episodes):
        assert isinstance(ep.instruction, str) and isinstance(ep.task, str), f"{ep.key}: task/instruction not str"
        indices = []
        for step in ep.steps():
            indices.append(step.index)
            for cam, img in step.images.items():
                assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3, \
                    f"{ep.key} step {step.index}: camera {cam!r} is {img.dtype} {img.shape}, expected (H, W, 3) uint8"
            for name, value in step.fields.items():
                assert np.ndim(value) == 0, f"{ep.key} step {step.index}: field {name!r} is not a scalar"
        assert indices == sorted(indices) and len(set(indices)) == len(indices), \
            f"{ep.key}: step indices {indices} are not strictly increasing"
        if ep.n_steps is not None:
            assert ep.n_steps == len(indices), f"{ep.key}: n_steps={ep.n_steps} but {len(indices)} steps"
