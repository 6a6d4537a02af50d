"""The docs run as written: README.md and every guide in docs/.

Each code block says whether the test runs it, in its fence's info string:

* ```` ```python ```` blocks run, in document order, one namespace per guide; ``file=NAME`` writes the block to
  NAME instead (an importable module), and a ``file=test_*.py`` block's ``test_*`` functions run where the block
  stands (a skip inside one fails: the guide promised it runs);
* ```` ```bash test ```` blocks run: each ``toolkit ...`` command in-process (the same click group the console
  script runs), in a fresh folder per guide, on the tiny defaults; ``# exits N`` after a command expects exit
  code N; environment set-up (``python3 -m venv``, ``. .venv/bin/activate``, ``pip install``) is not run, since
  the test runs in the environment it was installed in. Markers after ``test`` (``slow``, ``sim``, ``s3``, ``ray``)
  mark the guide's test;
* ```` ```bash skip=RULE ```` blocks are shown, not run, for one of the ``RULES`` below. ``test_what_is_not_run``
  reports each of them (and each set-up command) as a pytest skip with its reason, so ``-ra`` lists them all.

Fast checks beside: every block is marked; every ``toolkit`` command shown but not run parses against the real
CLI; every repository path and ``toolkit.*`` name the docs mention exists; links and anchors between the guides
resolve; the README stays short, links every guide, and keeps its test command in sync with ``.ci/run``.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from toolkit.sdk.plugins import plugin_manager, registry

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
SHELLS = {"bash", "sh", "shell", "console"}
MARKS = {"slow", "sim", "s3", "ray"}
# Why a block is shown but not run.  Each rule names what the command needs that a test machine does not have.
RULES = {
    "checkpoint": "needs a real checkpoint (weights from a model hub); tests/test_*_checkpoint*.py run the same "
                  "commands on tiny checkpoints in the real layouts",
    "gpu": "needs a CUDA GPU",
    "internet": "downloads from the internet",
    "data": "needs a dataset that does not ship with the toolkit",
    "sim": "needs the LIBERO simulator with Mesa rendering (the sim-marked tests run it)",
    "s3": "needs an object store and its credentials (tests/test_s3_store.py runs a local one)",
    "cluster": "needs a running Ray or Dask cluster",
    "install": "changes the Python environment; the docs test runs in the one it was installed in",
    "suite": "runs this test suite, which cannot run inside itself",
}
SETUP = (("python3", "-m", "venv"), ("python", "-m", "venv"), (".",), ("source",), ("pip", "install"))


@dataclass
class Block:
    guide: Path
    line: int
    lang: str
    info: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.guide.relative_to(ROOT)}:{self.line}"

    @property
    def words(self) -> list[str]:
        return self.info.split()

    @property
    def rule(self) -> str | None:
        return next((w.split("=", 1)[1] for w in self.words if w.startswith("skip=")), None)

    @property
    def file(self) -> str | None:
        return next((w.split("=", 1)[1] for w in self.words if w.startswith("file=")), None)

    @property
    def shell(self) -> bool:
        return self.lang in SHELLS

    @property
    def runs(self) -> bool:
        if self.shell:
            return bool(self.words) and self.words[0] == "test"
        return self.lang == "python" and self.rule is None

    @property
    def marks(self) -> set[str]:
        return set(self.words[1:]) & MARKS if self.shell and self.runs else set()


def blocks(guide: Path) -> list[Block]:
    text = guide.read_text()
    return [Block(guide, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2).strip(), m.group(3))
            for m in FENCE.finditer(text)]


def commands(block: Block) -> list[tuple[list[str], int, str]]:
    """(argv, expected exit code, source line) of every command of a shell block, ``&&`` chains split."""
    out = []
    for line in block.code.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        expect = re.search(r"#\s*exits (\d+)", line)
        argv = shlex.split(line, comments=True)
        while argv:
            cut = argv.index("&&") if "&&" in argv else len(argv)
            out.append((argv[:cut], int(expect.group(1)) if expect else 0, " ".join(line.split())))
            argv = argv[cut + 1:]
    return out


def is_setup(argv: list[str]) -> bool:
    return any(tuple(argv[:len(s)]) == s for s in SETUP)


ALL = [b for g in GUIDES for b in blocks(g)]


# --------------------------------------------------------------------------- what is not run, and why


def not_run() -> list[tuple[str, str]]:
    out = []
    for b in ALL:
        if b.shell and not b.runs and b.rule in RULES:
            for line in dict.fromkeys(line for _, _, line in commands(b)):
                out.append((f"{b.where} `{line}`", f"{b.rule}: {RULES[b.rule]}"))
        elif b.shell and b.runs:
            out += [(f"{b.where} `{' '.join(argv)}`", f"install: {RULES['install']}")
                    for argv, _, _ in commands(b) if is_setup(argv)]
        elif b.lang == "python" and b.rule in RULES:
            out.append((f"{b.where} (python)", f"{b.rule}: {RULES[b.rule]}"))
    return out


@pytest.mark.parametrize("what, why", not_run(), ids=[w for w, _ in not_run()])
def test_what_is_not_run(what, why):
    pytest.skip(f"{what} is not run: {why}")


def test_every_block_says_whether_the_docs_test_runs_it():
    for b in ALL:
        if b.shell:
            ok = (b.runs and set(b.words[1:]) <= MARKS) or (len(b.words) == 1 and b.rule in RULES)
            assert ok, f"{b.where}: mark a shell block `{b.lang} test [{'|'.join(sorted(MARKS))}]` or " \
                       f"`{b.lang} skip=RULE` with RULE one of {', '.join(RULES)}; got {b.info!r}"
            if b.runs:
                for argv, _, line in commands(b):
                    assert argv[0] == "toolkit" or is_setup(argv), \
                        f"{b.where}: a `test` block runs `toolkit` commands only; mark `{line}` skip=RULE"
        elif b.lang == "python":
            assert all(w.startswith(("file=", "skip=")) for w in b.words) and (b.rule is None or b.rule in RULES), \
                f"{b.where}: a python block takes file=NAME or skip=RULE, got {b.info!r}"


def _parse(argv: list[str]) -> None:
    """Parse one `toolkit` command line against the real CLI (options, choices, types) without running it."""
    from toolkit.cli import cli

    group = _group(cli)
    parent = click.Context(group, info_name="toolkit")
    args = argv[1:]
    while args and args[0].startswith("-"):  # the group's own options: --threads N, -v
        args = args[2:] if args[0] == "--threads" else args[1:]
    command = group.get_command(parent, args[0]) if args else None
    assert command is not None, f"no command in {argv}"
    try:
        command.make_context(args[0], args[1:], parent=parent)
    except click.exceptions.Exit:  # --help
        pass


def test_every_toolkit_command_shown_but_not_run_parses(capsys):
    """A command the docs show but do not run still has to be a valid command line of today's CLI."""
    for b in ALL:
        if b.shell and not b.runs:
            for argv, _, line in commands(b):
                if argv and argv[0] == "toolkit":
                    try:
                        _parse(argv)
                    except click.UsageError as e:
                        pytest.fail(f"{b.where}: `{line}` does not parse: {e.format_message()}")


# --------------------------------------------------------------------------- names, paths, links

CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?<![\w./-])((?:toolkit|plugins|tests|benchmarks|docs|\.ci)/[\w./-]*)")
DOTTED = re.compile(r"(?<![\w./-])(toolkit(?:_plugins)?(?:\.[A-Za-z_]\w*)+)")
GENERATED = {"benchmarks/out/"}  # written by the benchmarks, not in the repository


def _spans(guide: Path) -> list[str]:
    text = FENCE.sub("", guide.read_text())  # code blocks are run or parsed, not read for names
    return CODE_SPAN.findall(text)


def _resolve(name: str):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


@pytest.mark.parametrize("guide", GUIDES, ids=[g.name for g in GUIDES])
def test_every_path_and_name_the_guide_mentions_exists(guide):
    missing = []
    for span in _spans(guide):
        for path in REPO_PATH.findall(span):
            path = path.split("::")[0].rstrip(".,:;")
            if path not in GENERATED and not (ROOT / path).exists():
                missing.append(path)
        for name in DOTTED.findall(span):
            if name.endswith((".py", ".md", ".zarr")):
                continue
            try:
                _resolve(name)
            except (ImportError, AttributeError):
                missing.append(name)
    assert not missing, f"{guide.name} mentions what does not exist: {sorted(set(missing))}"


def _anchors(guide: Path) -> set[str]:
    heads = re.findall(r"^#+ (.+)$", FENCE.sub("", guide.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("guide", GUIDES, ids=[g.name for g in GUIDES])
def test_links_between_the_guides_resolve(guide):
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", guide.read_text())):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (guide.parent / file) if file else guide
        assert path.exists(), f"{guide.name} links to {target}: no such file"
        if anchor:
            assert anchor in _anchors(path), f"{guide.name} links to {target}: no such heading in {path.name}"


def test_the_readme_is_short_and_links_every_guide():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for guide in GUIDES[1:]:
        assert f"docs/{guide.name}" in text, f"the README does not link docs/{guide.name}"


def test_the_readmes_two_commands_are_what_ci_runs():
    text = README.read_text()
    assert "pip install -e . && toolkit extract --model pi0 --dataset libero --store stores/libero.zarr" in text
    test_command = "pip install -e '.[test]' && python -m pytest -q"
    assert test_command in text and 'python -m pytest -m "not slow"' in text
    ci = (ROOT / ".ci" / "run").read_text().replace("pip install -q ", "pip install ")
    assert test_command in ci, ".ci/run no longer runs the README's test command"


# --------------------------------------------------------------------------- the guides, run


def _group(cli):
    """A fresh `toolkit` group: its commands register anew, so plugins a guide registered show up."""
    return type(cli)(name="toolkit", callback=cli.callback, params=cli.params, context_settings=cli.context_settings)


def _toolkit(argv: list[str], expected: int, where: str) -> None:
    from toolkit.cli import cli

    result = CliRunner().invoke(_group(cli), argv[1:], prog_name="toolkit")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{where}: `{shlex.join(argv)}` raised") from result.exception
    assert result.exit_code == expected, \
        f"{where}: `{shlex.join(argv)}` exited {result.exit_code}, not {expected}:\n{result.output[-3000:]}"


def _run_tests(module_name: str, tmp_path: Path, where: str) -> None:
    module = importlib.import_module(module_name)
    for name, fn in vars(module).items():
        if not (name.startswith("test_") and callable(fn)):
            continue
        kwargs = {}
        for param in inspect.signature(fn).parameters:
            assert param == "tmp_path", f"{where}: {name} asks for fixture {param!r}; the docs test gives tmp_path"
            kwargs[param] = tmp_path / f"{module_name}.{name}"
            kwargs[param].mkdir()
        try:
            fn(**kwargs)
        except pytest.skip.Exception as e:  # the guide says its tests pass: a skip is a failure here
            pytest.fail(f"{where}: {name} skipped: {e}")


def _guide_params():
    out = []
    for guide in GUIDES:
        found = blocks(guide)
        if any(b.runs for b in found):
            marks = sorted(set().union(*(b.marks for b in found)))
            out.append(pytest.param(guide, marks=[getattr(pytest.mark, m) for m in marks], id=guide.name))
    return out


@pytest.mark.parametrize("guide", _guide_params())
def test_the_guide_runs_as_written(guide, tmp_path, monkeypatch, request):
    """Every python block and every `bash test` command of one guide, in order, in a fresh folder.  One thread
    for torch and BLAS (what OMP_NUM_THREADS=1 gives a user): the tiny models run several times faster so on a
    busy 2-core machine, and the results do not depend on it."""
    import torch

    if any("ray" in b.marks for b in blocks(guide)):
        request.getfixturevalue("ray_cluster")  # the session's one Ray cluster, which `--workers` joins
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pm = plugin_manager()
    plugins_before, modules_before = set(pm.get_plugins()), set(sys.modules)
    found = blocks(guide)
    for b in found:
        if b.file:
            (work / b.file).write_text(b.code)
    namespace: dict = {"__name__": f"docs.{guide.stem}"}
    try:
        for b in found:
            if not b.runs:
                continue
            if b.lang == "python" and b.file is None:
                exec(compile(b.code, b.where, "exec"), namespace)
            elif b.lang == "python" and Path(b.file).stem.startswith("test_"):
                _run_tests(Path(b.file).stem, tmp_path, b.where)
            elif b.shell:
                for argv, expected, _ in commands(b):
                    if not is_setup(argv):
                        _toolkit(argv, expected, b.where)
    finally:
        for plugin in set(pm.get_plugins()) - plugins_before:
            pm.unregister(plugin)
        for name in set(sys.modules) - modules_before:
            if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(work)):
                del sys.modules[name]
        registry.cache_clear()
        torch.set_num_threads(threads)


def test_a_missing_reference_check_is_a_loud_skip():
    from synthetic import SyntheticDataset, toolkit_tinyvla
    from toolkit.testing import check_model_adapter

    class NoReference(toolkit_tinyvla.TinyVLAAdapter):
        reference_hidden_states = None

    episode = next(SyntheticDataset(n_steps=1).episodes())
    with pytest.raises(pytest.skip.Exception, match="NOT compared with the model's own hidden states"):
        check_model_adapter(NoReference(), [(episode, next(episode.steps()))])
