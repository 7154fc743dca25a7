"""`axolotl xkd serve-teacher --model PATH`: serve a teacher's prompt log-probs over HTTP (vLLM's protocol subset)."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import click

from axolotl_xkd.options import DTYPE_NAMES


@click.command("serve-teacher")
@click.option("--model", "model_path", required=True, help="Teacher model directory (or hub id) for from_pretrained.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; the default keeps the server on this machine. Any other needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to bind; 0 picks a free one (printed at start).")
@click.option("--top-k-max", type=click.IntRange(min=1), default=None,
              help="Largest prompt_logprobs answered (default: the vocabulary size).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--served-model-name", default=None, help="Model name in /v1/models (default: --model).")
@click.option("--tokenizer", "tokenizer_path", default=None,
              help="Tokenizer directory when it is not beside the model (as xkd.teacher.tokenizer_path).")
@click.option("--trust-remote-code", is_flag=True, help="Passed to from_pretrained.")
@click.option("--attn-implementation", default=None, help="Attention kernel of the teacher (default: transformers').")
@click.option("--api-key", envvar="XKD_TEACHER_API_KEY", show_envvar=True, default=None,
              help="Key every /v1 request must send as 'Authorization: Bearer KEY' (the client reads it from the "
                   "variable xkd.teacher.api_key_env names); required off loopback. Prefer the environment variable: "
                   "a command line is visible to other users of the machine.")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=None,
              help="Largest request body accepted (default 64 MiB); larger ones get 413.")
@click.option("--max-request-tokens", type=click.IntRange(min=1), default=None,
              help="Most positions (prompts x longest prompt) scored in one forward (default 65536); more get 413.")
@click.option("--num-threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (default: torch's); on a CPU shared with the trainer, 1 avoids oversubscription.")
def serve_teacher(model_path: str, host: str, port: int, top_k_max: int | None, dtype: str, device: str | None,
                  served_model_name: str | None, tokenizer_path: str | None, trust_remote_code: bool,
                  attn_implementation: str | None, api_key: str | None, max_request_bytes: int | None,
                  max_request_tokens: int | None, num_threads: int | None) -> None:
    """Answer POST /v1/completions with prompt_logprobs and GET /v1/models, until interrupted (Ctrl-C or SIGTERM).

    Logs one line per request (method, path, status, positions scored, seconds) and one when it stops.
    """
    from axolotl_xkd.cli import checked
    from axolotl_xkd.locations import check_model_location

    for value, key in ((model_path, "--model"), (tokenizer_path, "--tokenizer")):
        if value is not None:
            checked(check_model_location, value, key)

    import torch

    from axolotl_xkd.server.app import MAX_REQUEST_BYTES, MAX_REQUEST_TOKENS, TeacherScorer, is_loopback, make_server

    if not is_loopback(host) and not api_key:  # checked before the model loads
        raise click.UsageError(f"--host {host} exposes the teacher beyond this machine: give it an API key "
                               "(--api-key, or the XKD_TEACHER_API_KEY environment variable), or bind 127.0.0.1")
    if num_threads:
        torch.set_num_threads(num_threads)

    # Axolotl's CLI has configured logging already (root at WARNING), so basicConfig only applies outside it; the
    # project logger gets INFO either way, for the access lines.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("axolotl_xkd").setLevel(logging.INFO)
    scorer = TeacherScorer.load(model_path, dtype=dtype, device=device, top_k_max=top_k_max, name=served_model_name,
                                tokenizer_path=tokenizer_path, trust_remote_code=trust_remote_code,
                                attn_implementation=attn_implementation,
                                max_request_tokens=max_request_tokens or MAX_REQUEST_TOKENS)
    server = make_server(scorer, host, port, api_key=api_key,
                         max_request_bytes=max_request_bytes or MAX_REQUEST_BYTES)
    bound_host, bound_port = server.server_address[:2]
    click.echo(f"xkd serve-teacher: {scorer.name} on http://{bound_host}:{bound_port} "
               f"(vocab {scorer.vocab_size}, top-k max {scorer.top_k_max}, "
               f"{'API key required' if api_key else 'no API key'})", nl=True)
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
