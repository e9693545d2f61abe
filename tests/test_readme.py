"""The README's two set-up commands are real: CI runs the test one, the main job exists."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _setup_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_has_the_two_set_up_commands():
    main_job, tests = _setup_commands()
    assert main_job == "pip install . && kgrad demo"
    assert tests == (
        'pip install ".[test,jax,torch]" && python -m pytest -n 2 '
        "&& KERAS_BACKEND=jax python -m pytest -n 2 "
        "&& KERAS_BACKEND=torch python -m pytest -n 2"
    )


def test_ci_runs_exactly_the_readme_test_command():
    _, tests = _setup_commands()
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    # The command itself, as its own line (the next one prints the times).
    assert tests in ci_lines


def test_readme_links_every_notebook_and_its_picture():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for notebook in sorted((ROOT / "examples").glob("*.ipynb")):
        assert f"(examples/{notebook.name})" in readme
    picture = re.search(r"!\[[^\]]*\]\(([^)]+)\)", readme).group(1)
    assert (ROOT / picture).is_file()
