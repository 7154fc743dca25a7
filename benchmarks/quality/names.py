"""The names the quality benchmarks give their arms: one short name per divergence (`fkl` for forward_kl, ...), the
run names of the coupled sweep (`coupled_<short>_<setting>`) and its settings (`Setting`: a name such as
observed_r0.25_w1 and its parser), and the coupled form's `xkd:` block at a setting's weights (the form itself is
the package's, options.COUPLED_FORM). Imports only the package's options."""

from __future__ import annotations

from dataclasses import dataclass

from axolotl_xkd.options import COUPLED_FORM, DIVERGENCES

# Every divergence's short name, the one map the drivers and their run names use.
SHORT: dict[str, str] = {"forward_kl": "fkl", "reverse_kl": "rkl", "jsd": "jsd", "skew_forward_kl": "sfkl",
                         "skew_reverse_kl": "srkl", "tvd": "tvd", "sequence": "seq"}
LONG: dict[str, str] = {short: name for name, short in SHORT.items()}  # fkl -> forward_kl, ...
assert set(SHORT) == set(DIVERGENCES), "a divergence without a short name"


@dataclass(frozen=True)
class Setting:
    """A coupled sweep setting: the TD target, lambda / w_kl (`ratio`) and w_kl; named e.g. observed_r0.25_w1."""

    target: str
    ratio: float
    w_kl: float

    @property
    def name(self) -> str:
        return f"{self.target}_{self.weights}"

    @property
    def weights(self) -> str:
        """The name without the target, e.g. r0.25_w1."""
        return f"r{self.ratio:g}_w{self.w_kl:g}"

    @classmethod
    def parse(cls, name: str) -> Setting:
        """The setting named `name` (observed_r0.25_w1 -> Setting("observed", 0.25, 1.0))."""
        target, rest = name.rsplit("_r", 1)
        ratio, w_kl = rest.split("_w")
        return cls(target, float(ratio), float(w_kl))

    def xkd(self) -> dict:
        """The coupled form's `xkd:` keys at this setting: lambda = ratio * w_kl."""
        return {"q_form": "ava", **COUPLED_FORM, "td_target": self.target, "td_weight": self.ratio * self.w_kl,
                "reward_kl_weight": self.w_kl}


def coupled_run(short: str, setting: str) -> str:
    """The run name of the coupled form with divergence `short` at `setting` (a Setting's name)."""
    return f"coupled_{short}_{setting}"


def setting_of(run: str) -> str | None:
    """The setting name of a coupled run (coupled_fkl_observed_r0.25_w1 -> observed_r0.25_w1); None for others."""
    return run.split("_", 2)[2] if run.startswith("coupled_") and run.count("_") >= 2 else None
