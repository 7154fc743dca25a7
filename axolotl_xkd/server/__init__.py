"""The teacher server: the wire protocol (protocol.py, vLLM's completions with prompt_logprobs), the HTTP client
(client.py) and the `axolotl xkd serve-teacher` server (app.py)."""
