"""Every experiment file in configs/ loads, its docstring's commands override keys that exist, and the result
passes the checks of the command that runs it (before any file is read)."""
import re
from pathlib import Path

import pytest

from nsync_jax.config import load_config
from nsync_jax.toyworld import demo, pretrain
from nsync_jax.train.config import check_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py") if p.stem != "__init__")
# The configs that a command other than `train` runs, that command, and its checks.
COMMANDS = {"demo": ("nsync-jax demo --output", demo.check_config),
            "toyworld_pretrain": ("nsync-jax toyworld pretrain --output", pretrain.check_config)}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_and_its_documented_command(path):
    doc = path.read_text().split('"""')[1]
    command, check = COMMANDS.get(path.stem, ("nsync-jax train --config configs/" + path.name, None))
    assert command in doc.replace("\\\n", " ")
    overrides = re.findall(r"--config\.(\S+=\S+)", doc)
    config = load_config(path, overrides)  # an unknown key in the docstring fails here
    if check:
        check(config)
        return
    if not config.model:  # configs/tiny.py leaves the model and data to the caller
        config.model = "model"
        config.data.images = "images"
    check_config(config)
