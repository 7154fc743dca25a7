"""End to end on several processes, launched as users launch Axolotl: DeepSpeed ZeRO-1/2/3 and plain DDP
with `DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m axolotl.cli.train cfg.yml`, and two torchrun
agents rendezvousing on loopback as two nodes (`axolotl train cfg.yml --launcher torchrun -- --nnodes 2`).
The backend is gloo on this CPU-only machine.

The test-only ProbePlugin (tests/e2e/probe.py) records per rank what really happened: the batches the
student saw, how accelerate counted and wrapped the ranks, DeepSpeed's partition state, whether the reward
head is optimised. Every multi-process run is compared with one process training the same global batch
(micro batch 4 x 4 accumulation steps = 2 ranks x micro batch 4 x 2 steps).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.support import (BIN, REPO, base_config, cli_env, free_port, log_history, merged, run_cli, train,
                           write_config)

pytestmark = pytest.mark.e2e

PLUGINS = ["axolotl_xkd.XKDPlugin", "tests.e2e.probe.ProbePlugin"]
# lambda = w_kl = 1 (the defaults are 0.1): the runs these tests compare were written for the larger reward terms,
# whose Adam steps keep the final weights of two summation orders within the tolerances below.
DISTRIBUTED = {"plugins": PLUGINS, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4,
               "save_steps": 2, "xkd": {"td_weight": 1.0, "reward_kl_weight": 1.0}}
TORCHRUN_ENV = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
COMPONENTS = ("xkd/distill", "xkd/td_nll", "xkd/reward_kl", "xkd/reward_mu", "xkd/reward_sigma")


def deepspeed_json(stage: int) -> str:
    return str(REPO / "example_configs" / "deepspeed" / f"zero{stage}.json")


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


def distributed_run(tiny_assets, tmp: Path, overrides: dict) -> Path:
    """Two processes on one node with `overrides`; returns the output directory."""
    config = merged(merged(base_config(tiny_assets, tmp), DISTRIBUTED), overrides)
    torchrun(write_config(tmp / "cfg.yml", config))
    return Path(config["output_dir"])


@pytest.fixture(scope="module")
def single(tiny_assets, tmp_path_factory) -> Path:
    """One process, no DeepSpeed, the same global batch as the two-process runs: 4 x 4 rows per step."""
    tmp = tmp_path_factory.mktemp("single")
    config = merged(base_config(tiny_assets, tmp), {**DISTRIBUTED, "gradient_accumulation_steps": 4})
    train(write_config(tmp / "cfg.yml", config))
    return Path(config["output_dir"])


def assert_data_parallel_over(out: Path, single: Path) -> None:
    """The ranks read disjoint micro-batches that together are the single process's, step by step, and the
    first steps log the single process's losses.

    Axolotl sets `average_tokens_across_devices: false`, so each rank's loss is the mean over its own
    tokens and the ranks are averaged: the total loss can differ from the one-process token mean by a
    fraction of a percent. The X-KD components are logged as token means over all ranks, so at step 1
    (same weights, same rows) they are equal; from step 2 on they carry that small weighting difference.
    """
    ranks, alone = probes(out), probes(single)[0]["batches"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["accelerator_processes"] == 2 for r in ranks)
    first, second = ranks[0]["batches"], ranks[1]["batches"]
    assert len(first) == len(second) == 8 and not set(first) & set(second)
    for step in range(4):
        together = set(first[2 * step:2 * step + 2]) | set(second[2 * step:2 * step + 2])
        assert together == set(alone[4 * step:4 * step + 4]), step
    # Gradients were synchronised: every rank ends with the same replicated parameters.
    assert ranks[0]["replicated_digest"] == ranks[1]["replicated_digest"]
    logged, reference = losses(out), losses(single)
    for key in COMPONENTS:
        assert logged[1][key] == pytest.approx(reference[1][key], rel=1e-4, abs=1e-6), key
        # The head's first Adam step is lr * sign(g) per weight: a weight whose gradient is near 0 can step the
        # other way under the ranks' weighting, moving the mean mu (about -0.03 here) by up to one lr (3e-3).
        assert logged[2][key] == pytest.approx(reference[2][key], rel=2e-2,
                                               abs=3e-3 if key == "xkd/reward_mu" else 1e-3), key
    for step in (1, 2):
        assert logged[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-2), step


# ZeRO-2 is `slow` (three two-process runs): CI runs ZeRO-3, the partitioned case, and ZeRO-2 in the two-node test.
@pytest.fixture(scope="module", params=[pytest.param(2, marks=pytest.mark.slow), 3], ids=["zero2", "zero3"])
def zero(request, tiny_assets, tmp_path_factory) -> dict:
    """A 4-step two-process run under ZeRO-`stage`, and a second run resumed from its checkpoint-2."""
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"zero{stage}")
    config = merged(base_config(tiny_assets, tmp), {**DISTRIBUTED, "deepspeed": deepspeed_json(stage)})
    torchrun(write_config(tmp / "cfg.yml", config))
    out = Path(config["output_dir"])
    resumed = merged(config, {"output_dir": str(tmp / "resumed"), "resume_from_checkpoint": str(out / "checkpoint-2")})
    torchrun(write_config(tmp / "resumed.yml", resumed))
    return {"stage": stage, "out": out, "resumed": tmp / "resumed"}


def test_parameters_are_partitioned(zero):
    ranks = probes(zero["out"])
    assert all(r["zero_stage"] == zero["stage"] for r in ranks)
    for r in ranks:
        if zero["stage"] == 3:
            # Each rank holds about half of every parameter (ZeRO-3 pads shards to equal size).
            assert r["student_local_numel"] <= r["student_numel"] // 2 + 64, r
        else:
            # ZeRO-2: parameters whole on every rank, fp32 master weights and optimizer state split in two.
            assert r["student_local_numel"] == r["student_numel"]
            assert all(count == 2 for count in r["partition_count"])
            assert abs(2 * r["optimizer_partition_numel"] - r["student_numel"]) <= 64, r


def test_teacher_placement(zero):
    """ZeRO-3 shards the teacher in an inference engine with no optimizer; otherwise each rank holds it once."""
    for r in probes(zero["out"]):
        teacher = r["teacher"]
        assert not teacher["requires_grad"]
        if zero["stage"] == 3:
            assert teacher["engine"] == "DeepSpeedEngine" and teacher["optimizer"] == "DeepSpeedZeRoOffload"
            assert teacher["local_numel"] <= teacher["numel"] // 2 + 64, teacher
        else:
            assert teacher["engine"] is None and teacher["local_numel"] == teacher["numel"]


def test_ranks_share_the_global_batch_of_a_single_process(zero, single):
    assert_data_parallel_over(zero["out"], single)


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


def test_chunked_loss_equals_the_unchunked_path(zero, tiny_assets, tmp_path):
    """The default chunked loss, fused with the output layer (under ZeRO-3 it runs as the layer's own forward,
    and the teacher's head is gathered once per batch), trains as the full-logit reference path does."""
    out = distributed_run(tiny_assets, tmp_path, {"deepspeed": deepspeed_json(zero["stage"]), "save_steps": 4,
                                                  "xkd": {"chunk_size": 0}})
    chunked, reference = probes(zero["out"]), probes(out)
    assert all(r["fused_loss"] and r["teacher"]["fusable"] for r in chunked)
    assert not any(r["fused_loss"] for r in reference)
    logged, expected = losses(zero["out"]), losses(out)
    for step in range(1, 5):
        for key in ("loss", "grad_norm", *COMPONENTS):
            assert logged[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-6), (step, key)
    for name in ("model.safetensors", "xkd_reward_head.safetensors"):
        got, want = load_file(zero["out"] / name), load_file(out / name)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["ddp", pytest.param("zero1", marks=pytest.mark.slow)])
def test_ddp_and_zero1(mode, tiny_assets, tmp_path, single):
    """Plain DDP (gloo) and ZeRO-1: the whole teacher on each rank, the data split, the gradients synced."""
    overrides = {"save_steps": 4} if mode == "ddp" else {"save_steps": 4, "deepspeed": deepspeed_json(1)}
    out = distributed_run(tiny_assets, tmp_path, overrides)
    ranks = probes(out)
    if mode == "ddp":
        assert all(r["wrapper"] == "DistributedDataParallel" and r["zero_stage"] is None for r in ranks)
    else:
        assert all(r["zero_stage"] == 1 and all(c == 2 for c in r["partition_count"]) for r in ranks)
    assert all(r["head_optimized"] and r["teacher"]["local_numel"] == r["teacher"]["numel"] for r in ranks)
    assert_data_parallel_over(out, single)
    assert (out / "xkd_reward_head.safetensors").is_file()


def test_two_nodes_on_loopback(tiny_assets, tmp_path, single):
    """Two torchrun agents, one process each, meet at a c10d rendezvous on 127.0.0.1 as two nodes would,
    launched with the line the README gives for multi-node runs (ZeRO-2)."""
    config = merged(base_config(tiny_assets, tmp_path),
                    {**DISTRIBUTED, "save_steps": 4, "deepspeed": deepspeed_json(2)})
    path = write_config(tmp_path / "cfg.yml", config)
    launch = [str(BIN / "axolotl"), "train", str(path), "--launcher", "torchrun", "--", "--nnodes", "2",
              "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
              "--rdzv_id", "xkd-loopback"]
    env = cli_env(TORCHRUN_ENV)
    nodes = [subprocess.Popen(launch, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-8000:]
    out = Path(config["output_dir"])
    assert sorted(r["node_rank"] for r in probes(out)) == ["0", "1"]
    assert_data_parallel_over(out, single)


def test_on_policy_steps_under_zero3(tiny_assets, tmp_path):
    """Every step on-policy: both ranks generate with the gathered student, score with the sharded teacher, train."""
    xkd = {"sequences": "on_policy", "on_policy_fraction": 1.0, "generation": {"max_new_tokens": 6}}
    out = distributed_run(tiny_assets, tmp_path, {"gradient_accumulation_steps": 1, "max_steps": 2,
                                                  "deepspeed": deepspeed_json(3), "xkd": xkd})
    logs = list(losses(out).values())
    assert len(logs) == 2 and all(e["xkd/on_policy_fraction"] == 1.0 and e["xkd/gen_length"] > 0 for e in logs)
    ranks = probes(out)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["student_local_numel"] <= r["student_numel"] // 2 + 64 for r in ranks)
    assert (out / "xkd_reward_head.safetensors").is_file()
