"""The Gaussian reward posterior q_phi(R_i) = N(mu_i, sigma_i^2) read from the student's hidden states."""

from __future__ import annotations

from torch import Tensor, nn

from axolotl_xkd.losses.precision import upcast


class VariationalRewardHead(nn.Module):
    """[mu, log sigma] = Linear(H, 2)(h), zero-initialised, so mu = 0 and sigma = 1 at the start.

    log sigma is clamped to [log_std_min, log_std_max]: with lambda > w_kl and a head that fits the
    TD differences exactly, the objective would otherwise be unbounded below as sigma -> 0.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        log_std_min: float = -5.0,
        log_std_max: float = 5.0,
        metadata: dict | None = None,
    ) -> None:
        super().__init__()
        if not log_std_min < log_std_max:
            raise ValueError(f"log_std_min ({log_std_min}) must be below log_std_max ({log_std_max})")
        self.hidden_size = hidden_size
        self.log_std_min = log_std_min
        self.log_std_max = log_std_max
        self.metadata = dict(metadata or {})
        self.proj = nn.Linear(hidden_size, 2)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def config(self) -> dict:
        """Everything needed to rebuild the head, plus free-form metadata (JSON-serialisable)."""
        return {
            **self.metadata,
            "hidden_size": self.hidden_size,
            "log_std_min": self.log_std_min,
            "log_std_max": self.log_std_max,
        }

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(..., H) -> (mu, log sigma), each (...,), at least float32."""
        out = upcast(self.proj(hidden.to(self.proj.weight.dtype)))
        return out[..., 0], out[..., 1].clamp(self.log_std_min, self.log_std_max)
