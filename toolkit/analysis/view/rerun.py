"""``toolkit view --rerun out.rrd``: the viewer's timelines as a rerun recording (rerun-sdk, the ``rerun`` extra),
for the robotics community's viewer (``rerun out.rrd``).

The same data the HTML page holds (``toolkit.analysis.view._page_data``: the same episodes, bounds and notes), on
one timeline, ``step`` (the dataset's step number), per episode: ``episodes/<key>/instruction`` (text, static),
``…/action/dataset`` and ``…/action/predicted`` (one scalar series per action dimension), ``…/probe/<site.layer>``
(the probe's confidence in the true label) and ``…/camera/<camera>`` (the frames, JPEG as in the page).  With an
intervention run, each run's series sit under ``…/<run>/``."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from toolkit.sdk.errors import ToolkitError


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", text).strip("/") or "_"


def write_rerun(data: dict, out: str | Path) -> Path:
    """Write ``data`` (what the page shows) as a rerun recording at ``out``."""
    try:
        import rerun as rr
    except ImportError:
        raise ToolkitError("--rerun needs rerun-sdk: pip install 'toolkit[rerun]'") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = rr.RecordingStream("toolkit_view")
    rec.save(str(out))
    runs, cells = data["runs"], (data["meta"].get("probe") or {}).get("cells") or []
    outcome = {1: "success", 0: "failure"}
    for ep in data["episodes"]:
        root = f"episodes/{_slug(ep['key'])}"
        rec.log(f"{root}/instruction", rr.TextDocument(f"{ep['instruction']}\n\ntask {ep['task']} "
                                                       f"({outcome.get(ep['success'], 'outcome unknown')})"),
                static=True)
        for k, step in enumerate(ep["steps"]):
            rec.set_time("step", sequence=int(step))
            row = (ep.get("dataset_action") or [None] * len(ep["steps"]))[k]
            if row is not None and None not in row:
                rec.log(f"{root}/action/dataset", rr.Scalars(row))
            for run in runs:
                r, base = ep["runs"][run], root if len(runs) == 1 else f"{root}/{_slug(run)}"
                action = (r.get("action") or [None] * len(ep["steps"]))[k]
                if action is not None and None not in action:
                    rec.log(f"{base}/action/predicted", rr.Scalars(action))
                for c, cell in enumerate(cells if r.get("conf") else []):
                    v = r["conf"][c][k]
                    if v is not None:
                        rec.log(f"{base}/probe/{_slug(cell)}", rr.Scalars([v]))
                for cam, uris in (r.get("frames") or {}).items():
                    if uris[k]:
                        jpeg = base64.b64decode(uris[k].split(",", 1)[1])
                        rec.log(f"{base}/camera/{_slug(cam)}", rr.EncodedImage(contents=jpeg, media_type="image/jpeg"))
    rec.flush()
    del rec
    return out
