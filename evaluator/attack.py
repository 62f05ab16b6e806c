"""The unsupervised encoder attack of Kuzina et al. (2022), batched: L-inf PGD on the symmetric KL.

For a reference image x_r the attack looks for x_a = x_r + eps, ||eps||_inf <= delta, pixels in [0, 1], that
maximizes SKL(q(z|x_r), q(z|x_a)) = KL(q_r || q_a) + KL(q_a || q_r). The reference code (one image at a time)
starts from a random perturbation (the SKL gradient at eps = 0 is exactly zero), takes plain gradient steps
with learning rate `step_size` (SGD, the paper's "step size 1.0"), halves the rate after 20 iterations
without improvement (ReduceLROnPlateau), and projects back onto the delta-ball and the pixel range after every
step. We do the same for a whole batch, with a per-image learning rate, and return each image's best iterate
(not the last), so the reported SKL never decreases with more iterations. `update="sign"` switches to the
Madry et al. signed step of size step_size * delta, for models whose raw gradients are badly scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

UPDATES = ("sgd", "sign")


@dataclass(frozen=True)
class AttackConfig:
    delta: float  # L-inf radius, in pixel units of [0, 1]
    iterations: int  # gradient steps per image
    step_size: float = 1.0  # SGD learning rate ("sgd") or fraction of delta per step ("sign")
    update: str = "sgd"
    plateau_patience: int = 20  # halve an image's step size after this many steps without a new best


@dataclass
class AttackResult:
    x_adv: torch.Tensor  # (B, C, H, W) the best iterate per image
    skl: torch.Tensor  # (B,) its symmetric KL to q(z|x_r)
    skl_trace: torch.Tensor  # (iterations + 1, B) best SKL so far after each evaluation (the start counts)


def symmetric_kl(mean_a, logvar_a, mean_b, logvar_b) -> torch.Tensor:
    """KL(a || b) + KL(b || a) for diagonal Gaussians, summed over latent dimensions -> (B,)."""
    var_ratio = torch.exp(logvar_a - logvar_b)
    sq = (mean_a - mean_b) ** 2
    return 0.5 * (var_ratio + 1 / var_ratio - 2 + sq * (torch.exp(-logvar_a) + torch.exp(-logvar_b))).sum(-1)


def project(x: torch.Tensor, x_ref: torch.Tensor, delta: float) -> torch.Tensor:
    """Nearest point in the delta-ball around x_ref that is also a valid image (pixels in [0, 1])."""
    return (x_ref + (x - x_ref).clamp(-delta, delta)).clamp(0, 1)


def random_start(x_ref: torch.Tensor, delta: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform noise in the delta-ball, projected to the pixel range: where each seed's attack begins."""
    noise = torch.rand(x_ref.shape, generator=generator, device=x_ref.device, dtype=x_ref.dtype)
    return project(x_ref + (2 * noise - 1) * delta, x_ref, delta)


def pgd_symmetric_kl(vae, x_ref: torch.Tensor, x_start: torch.Tensor, config: AttackConfig,
                     progress: bool = False) -> AttackResult:
    """Run the attack on a batch; each image is independent (per-image step size and best iterate)."""
    if config.update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {config.update!r}")
    with torch.no_grad():
        mean_r, logvar_r = vae.encode(x_ref)
    batch = x_ref.shape[0]
    rate = torch.full((batch,), float(config.step_size), device=x_ref.device)
    stalled = torch.zeros(batch, dtype=torch.long, device=x_ref.device)
    x = project(x_start, x_ref, config.delta)
    best_x = x.clone()
    best = torch.full((batch,), -float("inf"), device=x_ref.device)
    trace = []
    for step in tqdm(range(config.iterations + 1), desc="PGD", unit="step", leave=False, disable=not progress):
        x.requires_grad_(True)
        skl = symmetric_kl(*vae.encode(x), mean_r, logvar_r)
        improved = skl.detach() > best
        best = torch.where(improved, skl.detach(), best)
        best_x[improved] = x.detach()[improved]
        trace.append(best.clone())
        if step == config.iterations:
            break
        (grad,) = torch.autograd.grad(skl.sum(), x)  # images are independent: per-image gradients
        stalled = torch.where(improved, 0, stalled + 1)
        halve = stalled >= config.plateau_patience
        rate = torch.where(halve, rate / 2, rate)
        stalled = torch.where(halve, 0, stalled)
        r = rate.view(-1, *[1] * (x.dim() - 1))
        step_dir = grad if config.update == "sgd" else grad.sign() * config.delta
        x = project(x.detach() + r * step_dir, x_ref, config.delta)
    return AttackResult(best_x, best, torch.stack(trace))
