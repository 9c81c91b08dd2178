"""Rectified flow: straight paths from data (t=0) to noise (t=1), learned as a velocity.

    x_t = (1 - t) x_0 + t ε        target velocity v = ε - x_0

Training draws t from a logit-normal (most weight mid-way, where the path is hardest to guess)
and shifts it towards noise as the token count grows: a bigger video keeps more of its structure
at a given noise level, so it needs more time at high noise (SD3's resolution-dependent shift).
Sampling integrates dx/dt = v from t=1 to t=0 with Euler or Heun over the same shifted times, or
takes stochastic steps that renew part of the noise at every step (the rectified-flow form of
ancestral sampling), which forgets rather than compounds an imperfect model's early errors.

The noise may share part of its variance across a clip's latent steps (`frame_correlation`, the
"mixed noise" of Ge et al., "Preserve Your Own Correlation", 2023): the frames of a clip are alike,
and independent noise per latent step lets a model decide the layout of each step on its own at
high noise (one object fading out where another fades in). Training and sampling must draw the
same noise, so the setting travels with the model in pipeline.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t of shape (B,)) -> v
NoiseFn = Callable[[torch.Size], torch.Tensor]  # shape -> standard normal noise of that shape


@dataclass(frozen=True)
class FlowSchedule:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    reference_tokens: int = 80  # tokens of a 64x64, 17-frame clip: shift 1 there
    max_shift: float = 4.0
    frame_correlation: float = 0.0  # share of the noise's variance common to all latent steps of a clip

    def __post_init__(self):
        if not 0 <= self.frame_correlation < 1:  # NaN fails this too
            raise ValueError(f"frame_correlation must be at least 0 and below 1, not {self.frame_correlation!r}")

    def noise(self, shape, generator=None) -> torch.Tensor:
        """Standard normal noise for latents (B, C, T, H, W) whose latent steps correlate by
        `frame_correlation`; with 0, exactly torch.randn(shape), so older models keep their videos."""
        independent = torch.randn(shape, generator=generator)
        if not self.frame_correlation:
            return independent
        shared = torch.randn((*shape[:2], 1, *shape[3:]), generator=generator)  # one draw for every latent step
        return math.sqrt(1 - self.frame_correlation) * independent + math.sqrt(self.frame_correlation) * shared

    def shift(self, tokens: int) -> float:
        return min(self.max_shift, max(1.0 / self.max_shift, math.sqrt(tokens / self.reference_tokens)))

    def sample_training_times(self, batch: int, tokens: int, generator=None, device=None) -> torch.Tensor:
        normal = torch.randn(batch, generator=generator, device=device) * self.logit_std + self.logit_mean
        return shift_time(torch.sigmoid(normal), self.shift(tokens))

    def path_times(self, batch: int, tokens: int, window: tuple[float, float] = (0.0, 1.0), generator=None) -> torch.Tensor:
        """Times uniform over a window of the sampler's path before the shift, as its steps are
        spaced: what a model learns for sampling (distillation, or one stretch of it) trains on."""
        low, high = window
        return shift_time(low + (high - low) * torch.rand(batch, generator=generator), self.shift(tokens))

    def sampling_times(self, steps: int, tokens: int, device=None, strength: float = 1.0) -> torch.Tensor:
        """steps + 1 times from 1 (pure noise) down to 0 (the clean sample), evenly spaced before the
        shift; with `strength` below 1, from exactly that fraction of the path (before the shift)
        down, in that share of the steps (rounded up, at least one) at no wider a spacing: a sample
        started from a noised video (SDEdit) keeps what the noise at that time leaves of it. Where
        strength * steps is whole, these are the last times of the full schedule."""
        taken = max(1, math.ceil(steps * strength - 1e-9))
        return shift_time(torch.linspace(strength, 0.0, taken + 1, device=device), self.shift(tokens))


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def predicted_clean(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean sample a velocity points to from x_t: x_0 = x_t - t v (t a scalar or (B,))."""
    return x_t - t.reshape(-1, *([1] * (x_t.dim() - 1))) * velocity


def euler_sample(velocity: VelocityFn, noise: torch.Tensor, times: torch.Tensor, on_step=None, draw_noise: NoiseFn = torch.randn) -> torch.Tensor:
    x = noise
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        x = x + (t_next - t) * velocity(x, t.expand(x.shape[0]))
        if on_step is not None:
            on_step(i + 1, len(times) - 1)
    return x


def heun_sample(velocity: VelocityFn, noise: torch.Tensor, times: torch.Tensor, on_step=None, draw_noise: NoiseFn = torch.randn) -> torch.Tensor:
    """Second order: average the slopes at both ends of each step (Euler on the last, where t=0)."""
    x = noise
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        v = velocity(x, t.expand(x.shape[0]))
        x_euler = x + (t_next - t) * v
        if t_next > 0:
            v_next = velocity(x_euler, t_next.expand(x.shape[0]))
            x = x + (t_next - t) * 0.5 * (v + v_next)
        else:
            x = x_euler
        if on_step is not None:
            on_step(i + 1, len(times) - 1)
    return x


def stochastic_sample(velocity: VelocityFn, noise: torch.Tensor, times: torch.Tensor, on_step=None,
                      draw_noise: NoiseFn = torch.randn, churn: float = 0.5) -> torch.Tensor:
    """Predict the clean sample and the noise from v, then rebuild x at the next time from that
    prediction with a `churn` share of the noise variance drawn afresh (by `draw_noise`: seeded, so
    the same seed still gives the same video, and shaped like the model's training noise).
    churn = 0 is Euler exactly."""
    x = noise
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        v = velocity(x, t.expand(x.shape[0]))
        clean, predicted_noise = predicted_clean(x, v, t), x + (1 - t) * v
        fresh = draw_noise(x.shape).to(x.device)
        renewed = math.sqrt(1 - churn) * predicted_noise + math.sqrt(churn) * fresh
        x = (1 - t_next) * clean + t_next * renewed
        if on_step is not None:
            on_step(i + 1, len(times) - 1)
    return x


SAMPLERS = {"euler": euler_sample, "heun": heun_sample, "stochastic": stochastic_sample}
