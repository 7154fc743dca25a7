"""End to end under DeepSpeed ZeRO-3: two CPU processes launched by torchrun, as users launch Axolotl
(`DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m axolotl.cli.train cfg.yml`).

The test-only ProbePlugin (tests/e2e/probe.py) records per rank what DeepSpeed really did: partition
sizes, whether the reward head is optimised. The run trains 4 steps (checkpoints at 2 and 4) and a
second run resumes from checkpoint-2.

Not here, because they cannot run on this CPU-only CI: ZeRO-1/2 and plain DDP (Axolotl 0.19 pins
device_map to {"": LOCAL_RANK}, a CUDA index, for any world size above 1, before a plugin hook can
change it), and the data-sharding / single-process loss comparison (on the CPU both ranks received the
same batches, as ENVIRONMENT.md recorded for plain Axolotl too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.support import REPO, base_config, log_history, merged, run_cli, train, write_config

pytestmark = pytest.mark.e2e

PLUGINS = ["axolotl_xkd.XKDPlugin", "tests.e2e.probe.ProbePlugin"]
DISTRIBUTED = {"plugins": PLUGINS, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4,
               "save_steps": 2}
TORCHRUN_ENV = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


def torchrun(config_path: Path, *launcher_args: str):
    """`torchrun [launcher_args] -m axolotl.cli.train CONFIG` on the CPU (gloo), DeepSpeed's CPU accelerator."""
    args = list(launcher_args) or ["--nproc_per_node", "2"]
    return run_cli(["torchrun", *args, "-m", "axolotl.cli.train", str(config_path)], env=TORCHRUN_ENV)


def probes(output_dir: Path) -> list[dict]:
    """The ProbePlugin records of every rank, by rank."""
    records = [json.loads(p.read_text()) for p in sorted(output_dir.glob("probe_rank*.json"))]
    return sorted(records, key=lambda r: r["rank"])


def losses(output_dir: Path) -> dict[int, dict]:
    return {e["step"]: e for e in log_history(output_dir) if "loss" in e}


@pytest.fixture(scope="module", params=[3], ids=["zero3"])
def zero(request, tiny_assets, tmp_path_factory) -> dict:
    """A 4-step two-process run under ZeRO-`stage`, and a second run resumed from its checkpoint-2."""
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"zero{stage}")
    deepspeed = str(REPO / "example_configs" / "deepspeed" / f"zero{stage}.json")
    config = merged(base_config(tiny_assets, tmp), {**DISTRIBUTED, "deepspeed": deepspeed})
    torchrun(write_config(tmp / "cfg.yml", config))
    out = Path(config["output_dir"])
    resumed = merged(config, {"output_dir": str(tmp / "resumed"), "resume_from_checkpoint": str(out / "checkpoint-2")})
    torchrun(write_config(tmp / "resumed.yml", resumed))
    return {"stage": stage, "out": out, "resumed": tmp / "resumed"}


def test_parameters_are_partitioned(zero):
    ranks = probes(zero["out"])
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["zero_stage"] == zero["stage"] for r in ranks)
    for r in ranks:
        # Each rank holds about half of every parameter (ZeRO-3 pads shards to equal size).
        assert r["student_local_numel"] <= r["student_numel"] // 2 + 64, r


def test_teacher_is_sharded_without_optimizer(zero):
    for r in probes(zero["out"]):
        teacher = r["teacher"]
        assert not teacher["requires_grad"]
        assert teacher["engine"] == "DeepSpeedEngine" and teacher["optimizer"] == "DeepSpeedZeRoOffload"
        assert teacher["local_numel"] <= teacher["numel"] // 2 + 64, teacher


def test_reward_head_trained_and_saved_from_the_partitioned_state(zero):
    out = zero["out"]
    assert all(r["head_requires_grad"] and r["head_optimized"] for r in probes(out))
    at_2 = load_file(out / "checkpoint-2" / "xkd_reward_head.safetensors")
    at_4 = load_file(out / "checkpoint-4" / "xkd_reward_head.safetensors")
    final = load_file(out / "xkd_reward_head.safetensors")
    assert not torch.equal(at_2["proj.weight"], at_4["proj.weight"])  # it trains
    for key in at_4:
        assert torch.equal(final[key], at_4[key]), key
    # The head saved by rank 0 equals the one DeepSpeed's own (partitioned) checkpoint consolidates to.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-4"))
    for key, value in final.items():
        torch.testing.assert_close(consolidated[f"xkd_reward_head.{key}"].float(), value, rtol=0, atol=0)
    with safe_open(out / "model.safetensors", "pt") as f:
        student_keys = set(f.keys())
    assert student_keys and not [k for k in student_keys if "xkd" in k]
    assert student_keys <= {k for k in consolidated if not k.startswith("xkd_reward_head.")}


def test_resumed_run_continues_with_the_same_loss(zero):
    straight, resumed = losses(zero["out"]), losses(zero["resumed"])
    for step in (3, 4):
        for key in ("loss", "xkd/reward_mu", "xkd/td_nll"):
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-5, abs=1e-6), (step, key)
    final_straight = load_file(zero["out"] / "xkd_reward_head.safetensors")
    final_resumed = load_file(zero["resumed"] / "xkd_reward_head.safetensors")
    for key, value in final_straight.items():
        torch.testing.assert_close(final_resumed[key], value, rtol=1e-5, atol=1e-6)


def test_on_policy_steps_under_zero3(tiny_assets, tmp_path):
    """Every step on-policy: both ranks generate with the gathered student, score with the sharded teacher, train."""
    deepspeed = str(REPO / "example_configs" / "deepspeed" / "zero3.json")
    xkd = {"sequences": "on_policy", "on_policy_fraction": 1.0, "generation": {"max_new_tokens": 6}}
    config = merged(base_config(tiny_assets, tmp_path),
                    {**DISTRIBUTED, "gradient_accumulation_steps": 1, "max_steps": 2, "deepspeed": deepspeed,
                     "xkd": xkd})
    torchrun(write_config(tmp_path / "cfg.yml", config))
    out = Path(config["output_dir"])
    logs = list(losses(out).values())
    assert len(logs) == 2 and all(e["xkd/on_policy_fraction"] == 1.0 and e["xkd/gen_length"] > 0 for e in logs)
    ranks = probes(out)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["student_local_numel"] <= r["student_numel"] // 2 + 64 for r in ranks)
    assert (out / "xkd_reward_head.safetensors").is_file()
