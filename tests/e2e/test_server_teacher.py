"""`axolotl train` with `xkd.teacher.source: server` against `axolotl xkd serve-teacher` (a subprocess on a free
loopback port): with k = |V| its first logged loss equals the in-process teacher's on the same batch."""

from __future__ import annotations

import queue
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import BIN, ENV, REPO, base_config, log_history, merged, train, write_config

ROWS = 64
START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def small_assets(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("small_data")
    lines = (tiny_assets["data"] / "train.jsonl").read_text().splitlines()[:ROWS]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {**tiny_assets, "data": folder}


@pytest.fixture(scope="module")
def teacher_url(small_assets) -> Iterator[str]:
    """`axolotl xkd serve-teacher --port 0` in a subprocess; its URL read from the line it prints at start."""
    import os

    env = {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [str(BIN / "axolotl"), "xkd", "serve-teacher", "--model", str(small_assets["teacher"]), "--port", "0"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"serve-teacher printed no URL in {START_TIMEOUT_S}s:\n{''.join(seen)}") from None
            seen.append(line)
            if line.startswith("xkd serve-teacher:") and " on http://127.0.0.1:" in line:
                yield line.split(" on ")[1].split()[0]
                break
            assert proc.poll() is None, f"serve-teacher exited:\n{''.join(seen)}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_teacher_matches_model_teacher(small_assets, teacher_url, tmp_path):
    from transformers import AutoTokenizer

    k = len(AutoTokenizer.from_pretrained(small_assets["tokenizer"]))
    first = {}
    for source in ("model", "server"):
        config = merged(base_config(small_assets, tmp_path / source),
                        {"max_steps": 2, "save_steps": 2, "learning_rate": 1e-6})
        if source == "server":
            config["xkd"]["teacher"] = {"source": "server", "base_url": teacher_url, "top_k": k, "timeout_s": 60,
                                        "max_retries": 1, "prefetch": 2}
        train(write_config(tmp_path / f"{source}.yml", config))
        first[source] = log_history(tmp_path / source / "model")[0]
    model, served = first["model"], first["server"]
    # float32 log-probs sent as JSON decimals round-trip exactly; only the teacher's forward differs
    # (one sequence per request instead of a padded batch), at float32 rounding.
    assert served["xkd/distill"] == pytest.approx(model["xkd/distill"], rel=1e-4, abs=1e-6)
    assert served["loss"] == pytest.approx(model["loss"], rel=1e-4, abs=1e-6)
    assert model["xkd/distill"] > 0.05  # an untrained student is far from the teacher: the check has teeth
