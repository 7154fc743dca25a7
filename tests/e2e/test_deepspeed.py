"""End to end under DeepSpeed ZeRO-2 and ZeRO-3: two CPU processes launched by torchrun, as users launch
Axolotl (`DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m axolotl.cli.train cfg.yml`).

The test-only ProbePlugin (tests/e2e/probe.py) records per rank what DeepSpeed really did: partition
sizes, the batches each rank's student received, whether the reward head is optimised. Each stage
trains 4 steps (checkpoints at 2 and 4) and resumes a second run from checkpoint-2; one single-process
run without DeepSpeed on the same global batch is the reference for the losses.
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
# Global batch 16 per optimizer step in every run: 8 x 2 accumulation (1 process) = 4 x 2 x 2 ranks.
SINGLE = {"plugins": PLUGINS, "micro_batch_size": 8, "gradient_accumulation_steps": 2, "max_steps": 4, "save_steps": 2}
DISTRIBUTED = {**SINGLE, "micro_batch_size": 4}
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


@pytest.fixture(scope="module")
def single(tiny_assets, tmp_path_factory) -> Path:
    """Reference: one process, no DeepSpeed, the same global batch."""
    tmp = tmp_path_factory.mktemp("single")
    config = merged(base_config(tiny_assets, tmp), SINGLE)
    train(write_config(tmp / "cfg.yml", config), env={"PYTHONPATH": str(REPO)})
    return Path(config["output_dir"])


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
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
        if zero["stage"] == 3:
            # Each rank holds about half of every parameter (ZeRO-3 pads shards to equal size).
            assert r["student_local_numel"] <= r["student_numel"] // 2 + 64, r
        else:
            # ZeRO-2: each rank's fp32 master weights (and optimizer state) cover half the trainable parameters.
            assert r["partition_count"] == [2]
            assert r["optimizer_partition_numel"] <= r["student_numel"] // 2 + 64, r


def test_teacher_is_sharded_under_zero3_and_whole_otherwise(zero):
    for r in probes(zero["out"]):
        teacher = r["teacher"]
        assert not teacher["requires_grad"]
        if zero["stage"] == 3:
            assert teacher["engine"] == "DeepSpeedEngine" and teacher["optimizer"] == "DeepSpeedZeRoOffload"
            assert teacher["local_numel"] <= teacher["numel"] // 2 + 64, teacher
        else:
            assert teacher["engine"] is None and teacher["optimizer"] is None and teacher["local_numel"] == teacher["numel"]


def test_ranks_see_different_data(zero):
    rank0, rank1 = probes(zero["out"])
    assert len(rank0["batches"]) == len(rank1["batches"]) == 4 * 2  # steps x accumulation
    assert not set(rank0["batches"]) & set(rank1["batches"])


def test_first_losses_match_single_process(zero, single):
    distributed, reference = losses(zero["out"]), losses(single)
    for step in (1, 2):
        for key in ("loss", "xkd/distill", "xkd/td_nll"):
            assert distributed[step][key] == pytest.approx(reference[step][key], rel=2e-3), (step, key)


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_launch_on_loopback(tiny_assets, tmp_path):
    """Two torchrun agents (`--nnodes 2 --nproc_per_node 1`, c10d rendezvous on 127.0.0.1), started through
    the documented `axolotl train CONFIG --launcher torchrun -- ...` line, train together (DDP over gloo)."""
    import subprocess

    from tests.support import BIN, ENV

    endpoint = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "model"
    procs = []
    for node in (0, 1):
        # One prepared-data folder per node, as on machines without a shared disk.
        config = merged(base_config(tiny_assets, tmp_path), {
            **DISTRIBUTED, "max_steps": 2, "output_dir": str(out), "dataset_prepared_path": str(tmp_path / f"prep{node}"),
        })
        launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                    "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint]
        cmd = [str(BIN / "axolotl"), "train", str(write_config(tmp_path / f"node{node}.yml", config)),
               "--launcher", "torchrun", "--", *launcher]
        env = {**__import__("os").environ, **ENV, **TORCHRUN_ENV, "PATH": f"{BIN}:{__import__('os').environ['PATH']}"}
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(o[-5000:] for o in outputs)
    ranks = probes(out)
    assert [(r["rank"], r["world_size"], r["node_rank"]) for r in ranks] == [(0, 2, "0"), (1, 2, "1")]
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])
    assert (out / "model.safetensors").is_file() and (out / "xkd_reward_head.safetensors").is_file()
    assert sorted(losses(out)) == [1, 2]
