"""The notebooks' first code cell installs kgrad wherever a notebook runs.

Its logic (`kgrad_install_command`) is run here on fake folders: kgrad importable,
a notebook inside a checkout, a wheel beside the notebook, and nothing at all.
"""

import json
import pathlib
import sys

import pytest

pytestmark = pytest.mark.backends("tensorflow", "jax", "torch")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def _install_cell(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


@pytest.fixture(scope="module")
def install_command():
    namespace = {"__name__": "install_cell"}
    exec(_install_cell(NOTEBOOKS[0]), namespace)  # kgrad is importable: installs nothing
    assert namespace["command"] is None
    return namespace["kgrad_install_command"]


def test_every_notebook_starts_with_the_same_install_cell():
    cells = {path.name: _install_cell(path) for path in NOTEBOOKS}
    assert len(cells) == 4 and len(set(cells.values())) == 1
    assert "def kgrad_install_command" in cells[NOTEBOOKS[0].name]


def test_no_notebook_or_readme_names_a_source_that_does_not_exist():
    for path in [*NOTEBOOKS, ROOT / "README.md"]:
        text = path.read_text(encoding="utf-8")
        assert "git+https" not in text and "github.com/kgrad" not in text, path.name


def test_importable_installs_nothing(install_command, tmp_path):
    assert install_command(tmp_path, importable=True) is None


def _checkout(root):
    (root / "kgrad").mkdir(parents=True)
    (root / "kgrad" / "__init__.py").write_text("")
    (root / "setup.cfg").write_text("[metadata]\nname = kgrad\nversion = 0.1.0\n")
    (root / "examples").mkdir()
    return root


def test_a_notebook_in_a_checkout_installs_the_checkout(install_command, tmp_path):
    root = _checkout(tmp_path / "kgrad-main")
    (root / "examples" / "kgrad-0.0.1-py3-none-any.whl").write_text("")  # ignored
    command = install_command(root / "examples", importable=False)
    assert command == [sys.executable, "-m", "pip", "install", "--quiet", str(root)]
    # a folder named kgrad with another project's setup.cfg is not a checkout
    other = tmp_path / "other"
    (other / "kgrad").mkdir(parents=True)
    (other / "kgrad" / "__init__.py").write_text("")
    (other / "setup.cfg").write_text("[metadata]\nname = something-else\n")
    with pytest.raises(RuntimeError, match="kgrad is not installed here"):
        install_command(other, importable=False)


def test_a_notebook_beside_a_wheel_installs_the_newest_wheel(install_command, tmp_path):
    import os

    old = tmp_path / "kgrad-0.9.0-py3-none-any.whl"
    new = tmp_path / "kgrad-0.10.0-py3-none-any.whl"
    for age, wheel in ((100, old), (0, new)):
        wheel.write_text("")
        os.utime(wheel, (1_700_000_000 - age, 1_700_000_000 - age))
    (tmp_path / "other-1.0-py3-none-any.whl").write_text("")
    command = install_command(tmp_path, importable=False)
    assert command[:5] == [sys.executable, "-m", "pip", "install", "--quiet"]
    assert command[5:] == [str(new)]


def test_nothing_to_install_from_says_every_way(install_command, tmp_path):
    with pytest.raises(RuntimeError) as raised:
        install_command(tmp_path, importable=False)
    message = str(raised.value)
    assert str(tmp_path) in message
    assert "pip wheel --no-deps -w dist ." in message and "/content" in message
    assert "kgrad checkout" in message
