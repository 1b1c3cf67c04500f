"""The README and the project's other Markdown pages stay true: their Python examples run and
do what their comments say, their links and the files they name exist, every FASTNN_*
environment variable they document is one fastnn reads (and every one it reads is documented),
the commands they give are installed ones, and the tests the "Bad input" table names exist."""
import re
import subprocess
import shutil
from pathlib import Path

import pytest
import torch

import fastnn

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Top-level folders of the repository: a `path` in backticks under one of them names a file.
REPO_FOLDERS = (".ci/", "benchmarks/", "csrc/", "examples/", "fastnn/", "scripts/", "tests/")


def _readme():
    if not README.is_file():
        pytest.skip("no README.md next to the tests (an installed copy of them)")
    return README.read_text()


def _markdown_pages():
    """README.md and the Markdown pages git tracks (all of them: results pages link each other)."""
    _readme()
    pages = {README}
    if shutil.which("git") is not None and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        pages.update(ROOT / p for p in out.split() if (ROOT / p).is_file())
    return sorted(pages)


def _code_blocks(text, language):
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_examples_run_and_do_what_they_say():
    blocks = _code_blocks(_readme(), "python")
    assert len(blocks) >= 2, "the README's Python examples were not found"
    pytest.importorskip("torchvision")
    # The blocks build on each other (the second uses the first's imports): one namespace.
    ns = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), ns)
        except Exception as e:  # the README shows code that fails: say which block
            raise AssertionError(f"README.md python block {i + 1} raised {e!r}") from e

    # The first block's comments.
    assert isinstance(ns["bn"], fastnn.nn.BatchNorm2d)
    assert isinstance(ns["bn"], torch.nn.BatchNorm2d)   # a drop-in: isinstance checks hold
    assert ns["y"].shape == ns["x"].shape and bool((ns["y"] >= 0).all())  # relu=True
    assert not torch.equal(ns["rm"], torch.zeros(16))   # training=True moved the running mean
    assert ns["out"].shape == (32, 64, 56, 56) and bool((ns["out"] >= 0).all())

    # The second's: convert swaps every BatchNorm for fastnn's, and fuse_for_inference gives an
    # eval copy with the same eval outputs, its convs' batch norms folded away.
    import torchvision  # noqa: F401  (imported by the block)
    model, serving = ns["model"], ns["serving"]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m).__module__.startswith("fastnn") for m in bns)
    assert serving is not model and not serving.training and model.training
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in serving.modules())
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(serving(x), model(x), rtol=1e-4, atol=1e-4)


def test_readme_test_command_is_found():
    """.ci/run runs the line after the `<!-- test-command -->` marker; it must be there and run
    the suite."""
    text = _readme()
    match = re.search(r"<!-- test-command -->\n```bash\n([^\n]+)\n```", text)
    assert match, "README.md: no ```bash block right after <!-- test-command -->"
    assert "pytest tests" in match.group(1), match.group(1)


def test_markdown_links_and_named_files_exist():
    missing = []
    for page in _markdown_pages():
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the page
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(ROOT)}: link {target}")
        for name in re.findall(r"`([^`\s]+)`", text):
            name = name.split("::")[0].rstrip(".,:;")
            if name.startswith(REPO_FOLDERS) and not re.search(r"[*<>{}$]", name):
                if not (ROOT / name).exists():
                    missing.append(f"{page.relative_to(ROOT)}: `{name}`")
    assert not missing, "named in the Markdown pages but not in the repository:\n" + "\n".join(
        missing)


def test_bad_input_table_names_existing_tests():
    """Every row of the README's "Bad input" table names tests (in tests/test_errors.py unless a
    file is given), and each named test is defined where the row says."""
    text = _readme()
    section = text.split("### Bad input", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| input ")]
    assert rows, "no rows under ### Bad input"
    missing = []
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        # `test_x.py::test_y` names one test; a bare `test_x.py` is the file of the bare
        # `test_y` names after it (before any: tests/test_errors.py).
        named, current = [], "test_errors.py"
        for token in re.findall(r"`([^`]+)`", cells[-1]):
            match = re.fullmatch(r"(?:(test_\w+\.py)::)?(test_\w+)|(test_\w+\.py)", token)
            if match is None:
                continue
            if match.group(3):
                current = match.group(3)
            else:
                named.append((match.group(1) or current, match.group(2)))
        if not named:
            missing.append(f"row names no test: {cells[0]}")
        for file, test in named:
            source = (ROOT / "tests" / file).read_text()
            if not re.search(rf"^def {test}\(", source, flags=re.M):
                missing.append(f"{file}::{test} ({cells[0]})")
    assert not missing, "\n".join(missing)


def _read_env_vars():
    """FASTNN_* variables the package, its build and its kernels read (os.environ / getenv)."""
    kernels = (p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh"))
    sources = [ROOT / "setup.py", *(ROOT / "fastnn").rglob("*.py"), *kernels]
    pattern = re.compile(r"(?:getenv|environ\.get|environ)\s*[(\[]\s*\"(FASTNN_\w+)\"")
    found = set()
    for path in sources:
        if path.is_file():
            found.update(pattern.findall(path.read_text(errors="replace")))
    return found


def test_readme_documents_the_environment_variables_fastnn_reads():
    text = _readme()
    if not (ROOT / "setup.py").is_file() or not (ROOT / "csrc").is_dir():
        pytest.skip("not a source tree")
    documented = set(re.findall(r"\bFASTNN_\w+", text))
    read = _read_env_vars()
    assert read, "no FASTNN_* variable found in the sources: the pattern is stale"
    undocumented = sorted(read - documented)
    assert not undocumented, f"read by fastnn but not in README.md: {undocumented}"
    # The README may name variables of the scripts it documents (scripts/, .ci/, tests/).
    mentioned = set()
    for folder in ("scripts", ".ci", "tests", "benchmarks", "examples"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in ("", ".sh", ".py"):
                mentioned.update(re.findall(r"\bFASTNN_\w+", path.read_text(errors="replace")))
    unknown = documented - read - mentioned
    assert not unknown, f"in README.md but read nowhere: {sorted(unknown)}"


def test_readme_commands_are_installed_ones():
    """Every `fastnn-...` command the README runs is a console script of the package."""
    text = _readme()
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no pyproject.toml")
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", pyproject.read_text(),
                        flags=re.S | re.M)
    scripts = set(re.findall(r"^([\w-]+)\s*=", section.group(1), flags=re.M)) if section else set()
    commands = set()
    for block in _code_blocks(text, "bash"):
        commands.update(re.findall(r"(?:^|&&|\|\||;)\s*(fastnn-[\w-]+)", block, flags=re.M))
    assert commands, "the README runs no fastnn command: the pattern is stale"
    assert commands <= scripts, f"not in [project.scripts]: {sorted(commands - scripts)}"
