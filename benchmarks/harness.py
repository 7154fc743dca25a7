"""The benchmarks' and tests' shared harness: the offline environment, the tiny-asset Axolotl config written from a
base dict, `axolotl train` and the CLI run for real in a subprocess, a teacher server in a subprocess, and a CLI run
with a fault injected at a store shard (`HOOKED_CLI`). Importing it sets the offline environment first.

Benchmarks import it from here; tests/support.py re-exports it beside the test-only helpers (modules under
benchmarks/ import nothing from tests/, tests/unit/test_import_boundaries.py)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
for _key, _value in ENV.items():
    os.environ.setdefault(_key, _value)


def base_config(assets: dict[str, Path], out: Path) -> dict:
    """A plain Axolotl SFT config on the tiny assets, plus the plugin line and an `xkd:` block."""
    return {
        "base_model": str(assets["student"]),
        "tokenizer_config": str(assets["tokenizer"]),
        "plugins": ["axolotl_xkd.XKDPlugin"],
        "xkd": {"teacher": {"source": "model", "path": str(assets["teacher"])}},
        "datasets": [
            {
                "path": str(assets["data"] / "train.jsonl"),
                "ds_type": "json",
                "type": {
                    "field_instruction": "prompt",
                    "field_output": "response",
                    "format": "{instruction}",
                    "no_input_format": "{instruction}",
                },
            }
        ],
        "train_on_inputs": False,
        "dataset_prepared_path": str(out / "prepared"),
        "val_set_size": 0,
        "sequence_len": 32,
        "sample_packing": False,
        "micro_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "num_epochs": 1,
        "max_steps": 6,
        "optimizer": "adamw_torch",
        "learning_rate": 0.003,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_steps": 3,
        "seed": 42,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "attn_implementation": "sdpa",
        "output_dir": str(out / "model"),
        "save_safetensors": True,
        "report_to": "none",
        "dataloader_num_workers": 0,
    }


def merged(config: dict, overrides: dict) -> dict:
    """`config` with `overrides` merged in, recursively for dicts; a None value removes the key."""
    result = copy.deepcopy(config)
    for key, value in overrides.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def write_config(path: Path, config: dict) -> Path:
    """Write `config` as YAML and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for a rendezvous or a server of the test's own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(extra: dict | None = None) -> dict[str, str]:
    """The environment of a test's subprocess: this venv first on PATH, the offline settings, and a rendezvous port
    of its own (MASTER_PORT, and PET_MASTER_PORT, torchrun's --master_port), so that runs side by side (pytest -n 2,
    another job on the machine) never meet at torchrun's and DeepSpeed's default 29500."""
    port = str(free_port())
    return {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MASTER_PORT": port,
            "PET_MASTER_PORT": port, **(extra or {})}


def run_cli(args: list[str], *, env: dict | None = None, timeout: float = 900, check: bool = True,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a console script of this venv (e.g. ["axolotl", "train", cfg]); output captured as text."""
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]], env=cli_env(env), cwd=cwd or REPO, capture_output=True, text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-8000:]}")
    return proc


def train(config_path: Path, *, console: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Axolotl's training for real: `python -m axolotl.cli.train CONFIG`, the process that `axolotl train CONFIG`
    starts (through `accelerate launch`) for a one-process run, and that torchrun starts on every rank; or, with
    console, the `axolotl train` console script, launcher and all. The console script's two launcher processes
    (`axolotl`, then `accelerate launch`) add 15-20 s of imports to every run, so the suite goes through them only
    in the tests of the launch itself (tests/e2e/test_train.py's main run, test_versions.py, test_install.py)."""
    command = ["axolotl", "train"] if console else ["python", "-m", "axolotl.cli.train"]
    return run_cli([*command, str(config_path)], **kwargs)


def trained(assets: dict[str, Path], folder: Path, overrides: dict) -> Path:
    """`train` of `base_config(assets, folder)` with `overrides` (config written to folder/config.yml); returns the
    run's output directory."""
    config = merged(base_config(assets, folder), overrides)
    train(write_config(folder / "config.yml", config))
    return Path(config["output_dir"])


def post_status(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST `body` to `url`; the HTTP status it is answered with (an error status returned, not raised)."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def log_history(output_dir: Path) -> list[dict]:
    """The trainer's log entries of the newest checkpoint under `output_dir`."""
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    return state["log_history"]


class TeacherServerProcess:
    """A running `axolotl xkd serve-teacher` subprocess: its URL (read from the line it prints once bound), every
    line it has printed so far (a reader thread keeps the pipe drained), and ways to stop it."""

    def __init__(self, model_dir: Path, *extra: str, host: str = "127.0.0.1", port: int = 0,
                 env: dict | None = None, start_timeout: float = 180) -> None:
        full_env = {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.proc = subprocess.Popen(
            [str(BIN / "axolotl"), "xkd", "serve-teacher", "--model", str(model_dir), "--host", host,
             "--port", str(port), *extra],
            env=full_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        fresh: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(fresh,), daemon=True)
        self._reader.start()
        while True:
            try:
                line = fresh.get(timeout=start_timeout)
            except queue.Empty:
                self.kill()
                raise AssertionError(f"serve-teacher printed no URL in {start_timeout}s:\n{self.output}") from None
            if line is None:
                self.proc.wait(timeout=30)
                raise AssertionError(f"serve-teacher exited ({self.proc.returncode}):\n{self.output}")
            if line.startswith("xkd serve-teacher:") and " on http://" in line:
                break
        bound = line.split(" on http://")[1].split()[0]
        self.port = int(bound.rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"  # reached over loopback whatever address it bound

    def _read(self, fresh: queue.Queue) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            fresh.put(line)
        fresh.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> str:
        """SIGTERM (it prints its shutdown line), wait; returns everything it printed."""
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        return self.output

    def kill(self) -> str:
        """SIGKILL, as a crash or a preempted machine would end it; returns everything it printed."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        return self.output


@contextlib.contextmanager
def serve_teacher(model_dir: Path, *extra: str, start_timeout: float = 180) -> Iterator[str]:
    """`axolotl xkd serve-teacher --port 0` in a subprocess on loopback; yields its URL and stops it on exit."""
    server = TeacherServerProcess(model_dir, *extra, start_timeout=start_timeout)
    try:
        yield server.url
    finally:
        server.stop()


# One thread, as torchrun gives each rank: a store is then computed with the same kernels in the same order by one
# process or by two (docs/teachers.md: what two builds of one store may differ in).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def precompute_args(cfg: Path, out: Path, *, rows_per_shard: int, batch_size: int = 4) -> list[str]:
    """The arguments after `axolotl` of a top-8 `xkd precompute` of `cfg` into `out`."""
    return ["xkd", "precompute", str(cfg), "--out", str(out), "--top-k", "8", "--batch-size", str(batch_size),
            "--rows-per-shard", str(rows_per_shard)]


def with_first_rows(assets: dict[str, Path], folder: Path, rows: int) -> dict[str, Path]:
    """`assets` with a training file cut to its first `rows` rows (written into `folder`), for short runs."""
    lines = (assets["data"] / "train.jsonl").read_text().splitlines()[:rows]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {**assets, "data": folder}


# `python -c HOOKED_CLI ACTION:POINT:N ARG...` runs the console script `axolotl ARG...` (the real CLI, unchanged)
# with one fault injected at the N-th shard this process writes (counted from 0 in every run, so a resumed run
# counts again). POINT "written": after the shard is complete (renamed into place); "saved": after its files are in
# the shard's tmp folder, before its hash is recorded and it is renamed. ACTION "stop": the process stops itself
# (SIGSTOP), for a test to kill it at exactly that point (`kill_when_stopped`): no polling, no race with a busy
# machine. ACTION "enospc" (POINT "saved" only): from the N-th shard on, saving writes half a file and raises
# OSError(ENOSPC), as a full disk does.
HOOKED_CLI = """
import errno, os, signal, sys
import datasets
import axolotl_xkd.store.write as write
action, point, n = sys.argv.pop(1).split(":")
count = [0]
def fault():
    count[0] += 1
    if action == "stop" and count[0] == int(n):
        os.kill(os.getpid(), signal.SIGSTOP)
    return action == "enospc" and count[0] >= int(n)
if point == "written":
    real_write = write.write_shard
    def write_shard(*args, **kwargs):
        path = real_write(*args, **kwargs)
        fault()
        return path
    write.write_shard = write_shard
else:
    real_save = datasets.Dataset.save_to_disk
    def save_to_disk(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)
        if os.path.basename(str(path)).startswith(".tmp-shard-") and fault():  # not Axolotl's own prepared data
            arrow = next(p for p in os.listdir(path) if p.endswith(".arrow"))
            os.truncate(os.path.join(path, arrow), os.path.getsize(os.path.join(path, arrow)) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    datasets.Dataset.save_to_disk = save_to_disk
from axolotl.cli.main import main
sys.argv[0] = "axolotl"
sys.exit(main())
"""


def _hooked(fault: str, args: list[str]) -> list[str]:
    return [sys.executable, "-c", HOOKED_CLI, fault, *args]


def _cli_env(env: dict | None) -> dict:
    return {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}


def start_stopping_cli(args: list[str], stop_after: int, *, point: str = "written",
                       env: dict | None = None) -> subprocess.Popen:
    """`axolotl ARGS...` (ARGS without the leading "axolotl") in its own session, stopping itself at `point` of the
    `stop_after`-th store shard it writes (see HOOKED_CLI); output discarded."""
    return subprocess.Popen(_hooked(f"stop:{point}:{stop_after}", args), env=_cli_env(env), cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_disk_full_cli(args: list[str], full_from: int, *, env: dict | None = None,
                      timeout: float = 900) -> subprocess.CompletedProcess:
    """`axolotl ARGS...` whose store shard writes fail with ENOSPC from the `full_from`-th on (see HOOKED_CLI);
    output captured as text, the exit code not checked."""
    return subprocess.run(_hooked(f"enospc:saved:{full_from}", args), env=_cli_env(env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def kill_when_stopped(proc: subprocess.Popen) -> bool:
    """Wait until `proc` stops itself (then SIGKILL its whole session and return True) or exits (False, its
    exit code in proc.returncode)."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    proc.returncode = os.waitstatus_to_exitcode(status)
    return False
