"""axolotl_xkd: X-KD (experiential knowledge distillation) for Axolotl.

Cheap to import: `XKDPlugin` and `XKDArgs` load on first use, so `axolotl_xkd.losses` stays free of
Axolotl, transformers and DeepSpeed.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["XKDArgs", "XKDPlugin", "__version__"]


def __getattr__(name: str):
    if name == "XKDPlugin":
        from axolotl_xkd.plugin import XKDPlugin

        return XKDPlugin
    if name == "XKDArgs":
        from axolotl_xkd.args import XKDArgs

        return XKDArgs
    raise AttributeError(f"module 'axolotl_xkd' has no attribute {name!r}")
