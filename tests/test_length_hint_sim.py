"""The live simulator's length hint (episodes x policy calls at ``max_steps``): an upper bound that gives a closed-loop
run's progress bar a total and an ETA, never taken for the store's size.  Runs in the simulator's own process
(tests/simprocess.py), like tests/test_libero_sim.py."""

from __future__ import annotations

import re
import warnings

import toolkit
from synthetic import register_libero_sim
from test_libero_sim import needs_sim
from toolkit.run.samples import expected_samples
from toolkit.run.spec import RunSpec


@needs_sim
def test_the_simulator_hints_episodes_times_calls(capsys, tmp_path):
    register_libero_sim()
    from toolkit_plugins.libero_sim import LiberoSimDataset

    ds = LiberoSimDataset(suite="libero_object", tasks="0-2", trials=2)  # 280 steps, 5 per call: 56 calls
    assert ds.length_hint() == [56] * 6
    assert LiberoSimDataset(suite="libero_10", tasks="1", max_steps=12, replan_steps=5).length_hint() == [3]
    assert expected_samples(ds, RunSpec(dataset="libero-sim", max_episodes=4, stride=5)) == 4 * 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = toolkit.extract(model="pi0", dataset="libero-sim", store=tmp_path / "s.zarr", layers="0", stride=2,
                               max_steps=12, progress=True, model_options={"num_steps": 2},
                               dataset_options=dict(suite="libero_object", tasks="0", trials=1, replan_steps=5,
                                                    resolution=64, settle_steps=2))
    done, total = re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)[-1]
    s = toolkit.open_store(path)
    # 3 calls (12 steps, 5 per call), every 2nd stored; the random policy does not succeed within 12 steps
    assert int(total) == 2 and s.n_samples == int(done) <= int(total)
