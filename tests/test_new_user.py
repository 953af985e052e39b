"""What a new user reads first: README's set-up, the installed command, the Python example; the repository's ignores."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_setup_shows_progress_and_ci_runs_the_same_command():
    setup = re.search(r"```bash\n(python3 -m venv .*)\n```", README).group(1)
    assert " -q" not in setup  # pip's progress is the only sign of life for minutes
    assert setup in (ROOT / ".ci" / "run").read_text()


def test_installed_script_is_documented_and_points_at_the_cli():
    from flux_core.__main__ import main

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fluxcore"] == "flux_core.__main__:main" and callable(main)
    assert "fluxcore demo" in README and "fluxcore generate" in README


def test_python_example_saves_an_image_with_a_library_helper(tmp_path):
    import numpy as np

    from flux_core import outputs

    example = README.split("## Using it from Python", 1)[1].split("```", 2)[1]
    assert "from flux_core.outputs import save_images" in example and "save_images(gen.images" in example
    paths = outputs.save_images(np.zeros((1, 16, 16, 3), np.float32), tmp_path / "fox.png", {"seed": 1})
    assert paths == [tmp_path / "fox.png"] and outputs.read_params(paths[0])["seed"] == 1


def test_pip_install_leftovers_are_ignored():
    patterns = (ROOT / ".gitignore").read_text().split()
    assert "*.egg-info/" in patterns  # pip install -e writes comfyui_fluxcore.egg-info/
