"""`toolkit view STORE [--results PROBE_DIR] [--intervention RUN] -o view.html`: one self-contained HTML viewer."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.analysis.view import FRAME_SIZE, MAX_EPISODES, MAX_FRAMES


@click.command("view", epilog="""
\b
Examples:
  toolkit view stores/libero.zarr --results results/probe -o view.html
  toolkit view --intervention results/ablate --results results/probe -o ablate.html
  toolkit view stores/sim.zarr --episodes 0-9 --max-frames 500 -o sim.html
  toolkit view stores/sim.zarr --results results/probe --rerun sim.rrd     # for rerun's viewer
""")
@click.argument("store", required=False, type=click.Path())
@click.option("--results", type=click.Path(), default=None,
              help="A `toolkit probe` folder: its saved classification probes give the heatmap (--save-weights all "
                   "for every layer).")
@click.option("--intervention", type=click.Path(), default=None,
              help="A `toolkit intervene` folder: its unmodified and intervened rollouts side by side (STORE then "
                   "defaults to its unmodified store).")
@click.option("--target", default=None, help="The probe target whose confidence is shown (default task).")
@click.option("--episodes", default=None, help="Episodes by ordinal: 0-9 | 0,4,7 (default all).")
@click.option("-o", "--out", default="view.html", show_default=True, type=click.Path(path_type=Path),
              help="The HTML file to write.")
@click.option("--max-episodes", default=MAX_EPISODES, show_default=True, type=int,
              help="Episodes in the file at most (the first ones; the rest are left out with a note).")
@click.option("--max-frames", default=MAX_FRAMES, show_default=True, type=int,
              help="Frames in the file at most, over all episodes, cameras and runs; beyond it every k-th step "
                   "keeps its frame (0: no frames).")
@click.option("--frame-size", default=FRAME_SIZE, show_default=True, type=int,
              help="Longer side of a frame in the file, px (JPEG).")
@click.option("--rerun", "rerun", type=click.Path(path_type=Path), default=None,
              help="Write the same timelines as a rerun recording (.rrd; pip install 'toolkit[rerun]') instead of "
                   "the HTML file.")
def view_command(store, results, intervention, target, episodes, out, max_episodes, max_frames, frame_size, rerun):
    """Write one self-contained HTML file to scrub through a store's episodes: frames, actions, probe heatmap."""
    from toolkit.analysis.view import view

    path = view(store, out, results=results, intervention=intervention, target=target, episodes=episodes,
                max_episodes=max_episodes, max_frames=max_frames, frame_size=frame_size, rerun=rerun)
    for note in path.notes:
        click.echo(f"note: {note}", err=True)
    how = f"open it with: rerun {path}" if rerun else "open it in a browser, it needs no network"
    click.echo(f"wrote {path} ({path.size / 2**20:.1f} MiB; {how})")
