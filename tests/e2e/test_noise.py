"""Quiet, useful output: the final save is announced once, usage errors come before Axolotl's config dump, and
`serve-teacher` logs each request and its shutdown: a user reads each event once, where it is useful."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request

import pytest

from tests.support import BIN, REPO, base_config, cli_env, merged, post_status, run_cli, train, write_config

pytestmark = pytest.mark.e2e


def test_final_save_is_logged_once(untrained_assets, tmp_path):
    """Regression: Axolotl calls post_train twice, and "X-KD student saved to" was logged by both calls."""
    config = merged(base_config(untrained_assets, tmp_path), {"max_steps": 2, "save_steps": 2})
    proc = train(write_config(tmp_path / "config.yml", config))
    output = proc.stdout + proc.stderr
    assert output.count("X-KD student saved to") == 1, output[-4000:]
    assert (tmp_path / "model" / "xkd_reward_head.safetensors").is_file()


def assert_short_usage_error(proc, message: str) -> None:
    """Exit status 2 with `message`, and nothing like Axolotl's config dump (about 220 lines) around it: the output
    is Axolotl's banner, perhaps a few import warnings, and click's usage lines."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert message in proc.stderr, output
    assert len(output.splitlines()) < 60 and "learning_rate" not in output, output


def test_precompute_usage_error_comes_before_the_config(untrained_assets, tmp_path):
    """Regression: a missing --out was reported after Axolotl had printed the whole loaded config (220 lines)."""
    config = write_config(tmp_path / "config.yml", base_config(untrained_assets, tmp_path))
    proc = run_cli(["axolotl", "xkd", "precompute", str(config)], check=False)
    assert_short_usage_error(proc, "no output folder: pass --out DIR")
    assert str(untrained_assets["student"]) not in proc.stdout + proc.stderr  # nor a value of the config


def test_precompute_bad_teacher_block_is_reported_before_the_config(untrained_assets, tmp_path):
    config = merged(base_config(untrained_assets, tmp_path), {"xkd": {"teacher": {"source": "server"}}})
    proc = run_cli(["axolotl", "xkd", "precompute", str(write_config(tmp_path / "config.yml", config)),
                    "--out", str(tmp_path / "out")], check=False)
    assert_short_usage_error(proc, "xkd.teacher.base_url: Field required")


def test_score_usage_error_comes_before_loading(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n')
    proc = run_cli(["axolotl", "xkd", "score", "--model", str(tmp_path / "absent"), "--prompts", str(prompts)],
                   check=False)
    assert_short_usage_error(proc, "give exactly one of --responses FILE")


def _post(url: str, body: dict) -> int:
    return post_status(url, json.dumps(body).encode(), {"Content-Type": "application/json"})


def test_serve_teacher_logs_requests_and_shutdown(untrained_assets):
    env = cli_env()
    proc = subprocess.Popen(
        [str(BIN / "axolotl"), "xkd", "serve-teacher", "--model", str(untrained_assets["teacher"]), "--port", "0"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if " on http://127.0.0.1:" in line:
                break
        else:
            raise AssertionError(f"serve-teacher exited before serving:\n{''.join(seen)}")
        url = line.split(" on ")[1].split()[0]
        with urllib.request.urlopen(f"{url}/v1/models", timeout=60) as response:
            assert response.status == 200
        prompts = [[5, 6, 7, 8], [9, 10, 11]]
        assert _post(f"{url}/v1/completions", {"prompt": prompts, "prompt_logprobs": 2, "max_tokens": 1}) == 200
        assert _post(f"{url}/v1/completions", {"prompt": "text", "max_tokens": 1}) == 400
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    output = "".join(seen) + rest
    assert proc.returncode == 0, output
    access = [line for line in output.splitlines() if "serve-teacher 127.0.0.1" in line]
    assert len(access) == 3, output
    assert re.search(r'"GET /v1/models" 200 positions=0 \d+\.\d{3}s$', access[0]), access
    assert re.search(r'"POST /v1/completions" 200 positions=7 \d+\.\d{3}s$', access[1]), access
    assert re.search(r'"POST /v1/completions" 400 positions=0 \d+\.\d{3}s$', access[2]), access
    stops = [line for line in output.splitlines() if "stopped" in line]
    assert stops == [stops[0]] and "stopped by SIGTERM after 3 requests, 7 positions scored" in stops[0], output
