"""Run-time activation normalisation (``cfg.normalize_activations``), as SAELens applies it at inference.

Two modes change values at run time; the others are identities here:

* ``constant_norm_rescale``: ``x * coeff`` with ``coeff = sqrt(d_in) / ||x||`` per row; undone by ``/ coeff``.
* ``layer_norm``: ``(x - mu) / (std + eps)`` (``std`` of the centred row, unbiased, as ``Tensor.std``);
  undone by ``* std + mu`` (SAELens adds no ``eps`` on the way back, nor does this).
* ``none``, ``expected_average_only_in`` (folded into the weights when loaded from the registry) and
  ``covariance_whitening`` (folded by SAELens at save time): identity.

The statistics of one input travel as a :data:`NormState` from the encode to the decode that undoes it:
``("scale", coeff [..., 1])``, ``("ln", mu [..., 1], std [..., 1])``, or ``None``.
:class:`RunTimeNormalization` gives the SAE SAELens's methods for it (``run_time_activation_norm_fn_in`` /
``run_time_activation_norm_fn_out``, the ``x_norm_coeff`` / ``ln_mu`` / ``ln_std`` attributes).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from jaxtyping import Float
from torch import Tensor

NormState = Union[tuple[str, Tensor], tuple[str, Tensor, Tensor], None]
RESCALING_MODES = ("constant_norm_rescale", "layer_norm")  # the modes that change values at run time
LAYER_NORM_EPS = 1e-5  # SAELens's default


def normalize_in(
    x: Tensor, mode: str, d_in: int, eps: float = LAYER_NORM_EPS
) -> tuple[Tensor, NormState]:
    """``(normalised x [..., d_in], its NormState)``; identity modes return ``x`` itself and ``None``."""
    if mode == "constant_norm_rescale":
        coeff = (d_in**0.5) / x.norm(dim=-1, keepdim=True)
        return x * coeff, ("scale", coeff)
    if mode == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        centred = x - mu
        std = centred.std(dim=-1, keepdim=True)
        return centred / (std + eps), ("ln", mu, std)
    return x, None


def normalize_out(x: Tensor, state: NormState) -> Tensor:
    """Undo :func:`normalize_in` on ``x [..., d]`` with the statistics it returned (``None``: ``x``)."""
    if state is None:
        return x
    if state[0] == "scale":
        return x / state[1]
    if state[0] == "ln":
        return x * state[2] + state[1]
    raise ValueError(f"unknown normalisation state {state[0]!r}; expected 'scale' or 'ln'")


def state_field(state: NormState, name: str) -> Optional[Tensor]:
    """SAELens's attribute names for the statistics: ``x_norm_coeff`` (rescale), ``ln_mu`` / ``ln_std``
    (layer norm); None where ``state`` holds no such statistic."""
    if state is None:
        return None
    if name == "x_norm_coeff" and state[0] == "scale":
        return state[1]
    if state[0] == "ln" and name in ("ln_mu", "ln_std"):
        return state[1] if name == "ln_mu" else state[2]
    return None


class RunTimeNormalization:
    """Mixin of the SAE pipeline: SAELens's run-time normalisation API on ``cfg.normalize_activations``.

    The mode is read at call time from ``self.cfg``. The statistics of the last normalised input are kept
    in ``self._norm_state`` (a :data:`NormState`), set by ``encode`` / ``run_time_activation_norm_fn_in``
    and consumed by ``decode`` / ``run_time_activation_norm_fn_out``: one store for both, as SAELens's
    ``x_norm_coeff`` / ``ln_mu`` / ``ln_std`` attributes are.
    """

    cfg: Any
    _norm_state: NormState

    def _norm_in(self, x: Tensor, eps: float = LAYER_NORM_EPS) -> tuple[Tensor, NormState]:
        return normalize_in(x, self.cfg.normalize_activations, self.cfg.d_in, eps)

    def _norm_out(self, x: Tensor, norm: NormState) -> Tensor:
        if self.cfg.normalize_activations in RESCALING_MODES:
            if norm is None:
                raise RuntimeError(
                    f"decode() of a normalize_activations={self.cfg.normalize_activations!r} SAE needs the "
                    "statistics of the encode() call that produced the code; call encode() first"
                )
            return normalize_out(x, norm)
        return x

    def run_time_activation_norm_fn_in(
        self, x: Float[Tensor, "*batch d_in"], eps: float = LAYER_NORM_EPS
    ) -> Float[Tensor, "*batch d_in"]:
        """SAELens's run-time input normalisation for ``cfg.normalize_activations``.

        ``constant_norm_rescale``: ``x * sqrt(d_in) / ||x||``; ``layer_norm``: ``(x - mu) / (std + eps)``;
        other modes return ``x`` itself. Keeps the statistics (readable as ``x_norm_coeff`` /
        ``ln_mu`` / ``ln_std``) for the next :meth:`run_time_activation_norm_fn_out` or ``decode``,
        exactly as ``encode`` does.
        """
        out, state = self._norm_in(x, eps)
        self._norm_state = state
        return out

    def run_time_activation_norm_fn_out(
        self, x: Float[Tensor, "*batch d"], eps: float = LAYER_NORM_EPS
    ) -> Float[Tensor, "*batch d"]:
        """Undo :meth:`run_time_activation_norm_fn_in` with the statistics it (or ``encode``) kept, and
        drop them, as SAELens. ``eps`` is accepted for SAELens's signature; the inverse adds none.

        Raises ``AttributeError`` (SAELens's error) in a rescaling mode when no statistics are kept.
        """
        if self.cfg.normalize_activations not in RESCALING_MODES:
            return x
        if self._norm_state is None:
            raise AttributeError(
                f"{type(self).__name__}.run_time_activation_norm_fn_out needs the statistics of a "
                f"run_time_activation_norm_fn_in / encode call (normalize_activations="
                f"{self.cfg.normalize_activations!r}); call one of them first"
            )
        state, self._norm_state = self._norm_state, None
        return normalize_out(x, state)

    @property
    def norm_state(self) -> NormState:
        """The :data:`NormState` kept by the last ``encode`` / ``run_time_activation_norm_fn_in`` (None:
        none kept, or an identity mode), which the next ``decode`` undoes."""
        return self.__dict__.get("_norm_state")

    def pop_norm_state(self) -> NormState:
        """:attr:`norm_state`, dropped from the SAE (a later ``decode`` then needs a new ``encode``)."""
        state, self._norm_state = self.norm_state, None
        return state

    # the statistics under SAELens's attribute names (absent, as in SAELens, once they are consumed)
    @property
    def x_norm_coeff(self) -> Float[Tensor, "*batch 1"]:
        """``sqrt(d_in) / ||x||`` of the last normalised input (``constant_norm_rescale``)."""
        return self._norm_field("x_norm_coeff")

    @property
    def ln_mu(self) -> Float[Tensor, "*batch 1"]:
        """Row means of the last normalised input (``layer_norm``)."""
        return self._norm_field("ln_mu")

    @property
    def ln_std(self) -> Float[Tensor, "*batch 1"]:
        """Row standard deviations of the last normalised (centred) input (``layer_norm``)."""
        return self._norm_field("ln_std")

    def _norm_field(self, name: str) -> Tensor:
        value = state_field(self.__dict__.get("_norm_state"), name)
        if value is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return value
