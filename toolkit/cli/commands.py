"""The built-in commands, as a plugin: registered through the ``toolkit`` entry-point group and the
``register_commands`` hook exactly as a third-party plugin's commands are."""

from __future__ import annotations

from toolkit.sdk.hookspecs import hookimpl


@hookimpl
def register_commands(cli):
    from toolkit.cli.analysis import (
        compare_command,
        dataset_stats_command,
        projection_command,
        separation_command,
        stats_command,
    )
    from toolkit.cli.export import export_command
    from toolkit.cli.intervene import intervene_command
    from toolkit.cli.plugins import plugins_command
    from toolkit.cli.probe import probe_command, report_command
    from toolkit.cli.run import extract_command, import_command
    from toolkit.cli.store import info_command, verify_command
    from toolkit.cli.view import view_command

    for command, name in ((plugins_command, "plugins"), (extract_command, "extract"), (import_command, "import"),
                          (info_command, "info"), (verify_command, "verify"), (probe_command, "probe"),
                          (report_command, "report"), (export_command, "export"), (stats_command, "stats"),
                          (compare_command, "compare"), (projection_command, "projection"),
                          (dataset_stats_command, "dataset-stats"), (separation_command, "separation"),
                          (intervene_command, "intervene"), (view_command, "view")):
        cli.add_command(command, name)
