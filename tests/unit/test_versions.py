"""What differs between the supported Axolotl releases: the refusals and helpers of `axolotl_xkd.compat`,
checked through Axolotl's own config loading on whichever release is installed."""

from __future__ import annotations

import pytest
from packaging.version import Version

from axolotl_xkd.compat import axolotl_version
from tests.support import base_config, merged, write_config


@pytest.mark.parametrize("key", ["context_parallel_size", "sequence_parallel_degree"])
def test_context_parallel_is_refused(untrained_assets, tmp_path, key):
    """Context parallelism shards sequences in Axolotl's collator but not the teacher's per-token tensors."""
    from axolotl.cli.config import load_cfg

    config = merged(base_config(untrained_assets, tmp_path), {key: 2})
    with pytest.raises(Exception, match="context_parallel_size: 2") as info:
        load_cfg(str(write_config(tmp_path / "cfg.yml", config)))
    assert "not sharded along the sequence" in str(info.value)


def test_context_parallel_of_one_passes(untrained_assets, tmp_path):
    from axolotl.cli.config import load_cfg

    config = merged(base_config(untrained_assets, tmp_path), {"context_parallel_size": 1})
    assert load_cfg(str(write_config(tmp_path / "cfg.yml", config))).xkd is not None


def test_installed_release_is_in_the_supported_range():
    from packaging.specifiers import SpecifierSet

    from axolotl_xkd.compat import SUPPORTED_RANGE, TESTED, axolotl_version

    assert str(axolotl_version()) in SpecifierSet(SUPPORTED_RANGE)
    assert all(release in SpecifierSet(SUPPORTED_RANGE) for release in TESTED)


def test_supported_range_matches_pyproject():
    """The range the plugin warns outside of is the one pyproject.toml declares."""
    import tomllib

    from axolotl_xkd.compat import SUPPORTED_RANGE
    from tests.support import REPO

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"axolotl{SUPPORTED_RANGE}" in dependencies


def test_copy_reward_head(tmp_path):
    import torch

    from axolotl_xkd.compat import copy_reward_head
    from axolotl_xkd.losses.reward_head import VariationalRewardHead
    from axolotl_xkd.reward_store import load_reward_head, save_reward_head

    head = VariationalRewardHead(8, log_std_min=-5.0, log_std_max=5.0, metadata={"q_form": "ava"})
    with torch.no_grad():
        head.proj.weight.normal_()
    save_reward_head(head.state_dict(), head.config(), tmp_path / "adapter")
    copied = copy_reward_head(tmp_path / "adapter", tmp_path / "merged")
    assert sorted(p.name for p in copied) == ["xkd_reward_head.json", "xkd_reward_head.safetensors"]
    loaded, config = load_reward_head(tmp_path / "merged")
    torch.testing.assert_close(loaded.proj.weight, head.proj.weight)
    assert config["q_form"] == "ava"
    assert copy_reward_head(tmp_path / "empty", tmp_path / "merged2") == []


@pytest.mark.parametrize(
    ("config", "warns"),
    [({"xkd": {"divergence": "jsd"}}, True),
     ({"xkd": {"divergence": "jsd"}, "plugins": ["axolotl_liger.LigerPlugin"]}, True),
     ({"xkd": {"divergence": "jsd"}, "plugins": ["axolotl_xkd.XKDPlugin"]}, False),
     ({"xkd": {"divergence": "jsd"}, "plugins": ["axolotl_xkd.plugin:XKDPlugin"]}, False),
     ({"base_model": "x"}, False)],
)
def test_an_xkd_block_without_its_plugin_is_warned_about(caplog, config, warns):
    """Without the `plugins:` line Axolotl drops the `xkd:` block silently and trains plain SFT; Axolotl 0.21 runs the
    `axolotl.plugins` entry point XKDBlockCheck on every config, listed or not."""
    from axolotl.utils.dict import DictDefault

    from axolotl_xkd.plugin import XKDBlockCheck

    with caplog.at_level("WARNING", logger="axolotl_xkd"):
        XKDBlockCheck().register(DictDefault(config))
    assert ("lacks axolotl_xkd.XKDPlugin" in caplog.text) == warns, caplog.text


def test_block_check_is_an_axolotl_plugins_entry_point():
    import importlib
    import tomllib

    from axolotl.integrations.base import BasePlugin

    from axolotl_xkd.plugin import XKDBlockCheck
    from tests.support import REPO

    points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["axolotl.plugins"]
    module, attribute = points["xkd-block-check"].split(":")
    assert getattr(importlib.import_module(module), attribute) is XKDBlockCheck
    assert issubclass(XKDBlockCheck, BasePlugin)


@pytest.mark.skipif(axolotl_version() < Version("0.21"), reason="Axolotl 0.19 loads only the plugins a config lists")
def test_axolotl_loads_the_block_check_unlisted():
    from axolotl.integrations.base import get_builtin_plugins

    assert "axolotl_xkd.plugin.XKDBlockCheck" in get_builtin_plugins()
