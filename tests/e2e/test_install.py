"""The package as a non-editable install gives it (`pip install .`, or the README's git-URL install): a wheel built
from the checkout, installed into a fresh venv and run from outside the checkout, so no module can reach a file
of the repository. The venv sees this venv's dependencies through a path entry (reinstalling Axolotl would take
minutes and gigabytes), never its editable axolotl_xkd, whose finder is registered by a .pth file that a plain path
entry does not run."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support import ENV, REPO, base_config, merged, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv holding the wheel of this checkout (and only path access to the dependencies)."""
    root = tmp_path_factory.mktemp("installed")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, text=True, cwd=root)
    (wheel,) = wheels.glob("axolotl_xkd-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, cwd=root)
    (site / "xkd_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run(python: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), *args], env={**env, **ENV}, cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_installed_package_imports_from_the_venv_only(installed, tmp_path):
    found = run(installed, ["-c", "import axolotl_xkd, axolotl_xkd.scoring, axolotl_xkd.cli.score; "
                                  "print(axolotl_xkd.__file__)"], tmp_path).stdout.strip()
    assert Path(found).is_relative_to(installed.parent.parent) and not Path(found).is_relative_to(REPO), found


def test_installed_cli_and_schema(installed, untrained_assets, tmp_path):
    """`axolotl xkd --help` lists the commands, and the `xkd:` block validates through Axolotl's own schema."""
    help_text = run(installed, ["-m", "axolotl.cli.main", "xkd", "--help"], tmp_path).stdout
    assert all(name in help_text for name in ("precompute", "serve-teacher", "score", "plot")), help_text
    config = write_config(tmp_path / "cfg.yml",
                          merged(base_config(untrained_assets, tmp_path), {"xkd": {"divergence": "jsd"}}))
    code = ("import sys, yaml; from axolotl.cli.config import prepare_plugins; "
            "from axolotl.utils.config import validate_config; from axolotl.utils.dict import DictDefault; "
            "cfg = DictDefault(yaml.safe_load(open(sys.argv[1]))); prepare_plugins(cfg); "
            "print(validate_config(cfg).xkd['divergence'])")
    assert run(installed, ["-c", code, str(config)], tmp_path).stdout.strip().endswith("jsd")


def test_installed_package_trains(installed, untrained_assets, tmp_path):
    """A short `axolotl train` with the installed plugin writes the student and its reward head."""
    config = merged(base_config(untrained_assets, tmp_path), {"max_steps": 2, "save_steps": 2,
                                                              "micro_batch_size": 4})
    log = run(installed, ["-m", "axolotl.cli.main", "train", str(write_config(tmp_path / "cfg.yml", config)),
                          "--launcher", "python"], tmp_path)
    assert "axolotl_xkd 0.1.0 active" in log.stdout + log.stderr
    out = Path(config["output_dir"])
    assert (out / "model.safetensors").is_file() and (out / "xkd_reward_head.safetensors").is_file()
