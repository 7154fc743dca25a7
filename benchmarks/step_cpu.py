"""Why the X-KD / SFT step ratio depends on the CPU: the output layer alone (N x H x V products plus the loss,
forward and backward) of SFT's cross-entropy and of the X-KD chunked loss with a top-64 signal, at each torch
thread count, with the number of aten operators each runs.

    python -m benchmarks.step_cpu [--threads 1 2] [--repeats 5]

The issue's shape: N = 1024 positions (4 x 256), H = 256, V = 32000. Times are medians of the repeats after a
warm-up, in one process. Writes benchmarks/results/step_cpu.md (with the CPU model and load average) and prints it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import write_report
from benchmarks.step import cpu_model

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "step_cpu.md"
N, H, V, K = 1024, 256, 32000, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from axolotl_xkd.args import XKDConfig
    from axolotl_xkd.losses.chunked import chunked_xkd_loss
    from axolotl_xkd.losses.signal import TopKSignal
    from axolotl_xkd.wiring import hyperparams

    torch.manual_seed(0)
    hidden, weight, labels = torch.randn(1, N, H), torch.randn(V, H) * 0.02, torch.randint(0, V, (1, N))
    signal = TopKSignal(torch.randint(0, V, (1, N, K)), torch.log_softmax(torch.randn(1, N, K), -1))
    params = hyperparams(XKDConfig(teacher={"source": "precomputed", "path": "unused"}))  # the plugin's defaults

    def leaves():
        return hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def gemm() -> None:
        hidden[0] @ weight.T

    def sft() -> None:
        h, w = leaves()
        F.cross_entropy((h[0] @ w.T).float(), labels[0]).backward()

    def xkd() -> None:
        h, w = leaves()
        mu, log_sigma = (torch.zeros(1, N, requires_grad=True) for _ in range(2))
        chunked_xkd_loss(h, w, labels, teacher=signal, params=params, mu=mu, log_sigma=log_sigma,
                         vocab_size=V).loss.backward()

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    ops = {}
    for name, fn in (("sft", sft), ("xkd", xkd)):
        with Count() as count:
            fn()
        ops[name] = count.ops

    def ms(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        g, s, x = ms(gemm), ms(sft), ms(xkd)
        rows.append(f"| {threads} | {g:.1f} | {s:.1f} ({s / g:.2f}) | {x:.1f} ({x / g:.2f}) | {x / s:.2f}x |")
    report = "\n".join([
        "# The output layer alone: SFT's cross-entropy against the X-KD chunked loss, per thread count", "",
        f"`python -m benchmarks.step_cpu {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
        f"- date {datetime.now(UTC).isoformat(timespec='seconds')}, torch {torch.__version__}, CPU **{cpu_model()}**, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        f"- N {N}, H {H}, V {V}, top-{K} signal, the plugin's default loss settings; forward and backward; "
        f"aten operators per call: SFT {ops['sft']}, X-KD {ops['xkd']}", "",
        "| threads | one N x H x V product, ms | SFT ms (in products) | X-KD ms (in products) | X-KD / SFT |",
        "|---|---|---|---|---|",
        *rows, "",
    ])
    write_report(RESULTS, report)


if __name__ == "__main__":
    main()
