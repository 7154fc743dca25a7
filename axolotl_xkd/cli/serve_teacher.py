"""`axolotl xkd serve-teacher --model PATH`: serve a teacher's prompt log-probs over HTTP (vLLM's protocol subset)."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import click


@click.command("serve-teacher")
@click.option("--model", "model_path", required=True, help="Teacher model directory (or hub id) for from_pretrained.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the default keeps the server on this machine (it has no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to bind; 0 picks a free one (printed at start).")
@click.option("--top-k-max", type=click.IntRange(min=1), default=None,
              help="Largest prompt_logprobs answered (default: the vocabulary size).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--served-model-name", default=None, help="Model name in /v1/models (default: --model).")
@click.option("--tokenizer", "tokenizer_path", default=None,
              help="Tokenizer directory when it is not beside the model (as xkd.teacher.tokenizer_path).")
@click.option("--trust-remote-code", is_flag=True, help="Passed to from_pretrained.")
@click.option("--attn-implementation", default=None, help="Attention kernel of the teacher (default: transformers').")
@click.option("--num-threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (default: torch's); on a CPU shared with the trainer, 1 avoids oversubscription.")
def serve_teacher(model_path: str, host: str, port: int, top_k_max: int | None, dtype: str, device: str | None,
                  served_model_name: str | None, tokenizer_path: str | None, trust_remote_code: bool,
                  attn_implementation: str | None, num_threads: int | None) -> None:
    """Answer POST /v1/completions with prompt_logprobs and GET /v1/models, until interrupted (Ctrl-C or SIGTERM).

    Logs one line per request (method, path, status, positions scored, seconds) and one when it stops.
    """
    from axolotl_xkd.cli import checked
    from axolotl_xkd.locations import check_model_location

    for value, key in ((model_path, "--model"), (tokenizer_path, "--tokenizer")):
        if value is not None:
            checked(check_model_location, value, key)

    import torch

    from axolotl_xkd.server.app import TeacherScorer, make_server

    if num_threads:
        torch.set_num_threads(num_threads)

    # Axolotl's CLI has configured logging already (root at WARNING), so basicConfig only applies outside it; the
    # project logger gets INFO either way, for the access lines.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("axolotl_xkd").setLevel(logging.INFO)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"xkd serve-teacher: WARNING: binding {host}; the server has no authentication", err=True)
    scorer = TeacherScorer.load(model_path, dtype=dtype, device=device, top_k_max=top_k_max, name=served_model_name,
                                tokenizer_path=tokenizer_path, trust_remote_code=trust_remote_code,
                                attn_implementation=attn_implementation)
    server = make_server(scorer, host, port)
    bound_host, bound_port = server.server_address[:2]
    click.echo(f"xkd serve-teacher: {scorer.name} on http://{bound_host}:{bound_port} "
               f"(vocab {scorer.vocab_size}, top-k max {scorer.top_k_max})", nl=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, docker stop, systemd: stop as on Ctrl-C, with the line
    reason = "stopped"
    try:
        server.serve_forever()
    except KeyboardInterrupt as stop:
        reason = f"stopped by {stop.args[0] if stop.args else 'SIGINT'}"
    finally:
        server.server_close()
        click.echo(f"xkd serve-teacher: {reason} after {server.summary()}")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Turn a termination signal into the KeyboardInterrupt that Ctrl-C raises, naming the signal."""
    raise KeyboardInterrupt(signal.Signals(signum).name)
