"""The robustness gap as Kuzina et al.'s public code measures it (`vaegen-eval --robustness-protocol kuzina`).

The paper's Table 2 attack settings are, digit for digit, those of the FashionMNIST attack script of Kuzina,
Welling & Tomczak's code for attacking VAEs (github.com/AKuzina/defend_vae_mcmc at e993225, "their code";
file:line below). This module follows that code step by step; the README's evaluator section sets every step
beside vaegen's own protocol (`evaluator.attack`, `evaluator.gaps.robustness_gap`).

    images    the first 1024 test images (their one test batch), 50 drawn class-stratified by sklearn's
              train_test_split under seed 1234                  run_attack.py:27,67-71, attack/trainer.py:14-20
    restarts  10 per image, each kept and averaged (not the best of 10)        attack/attacker.py:98-100
    start     eps ~ N(0, 0.2^2) per pixel, not projected onto the delta-ball          attack/attacker.py:66-68
    step      per iteration: clamp x_r + eps to the reference image's own [min, max]; SGD step (lr 1) on
              -SKL_avg, SKL_avg = (KL(q_a || q_r) + KL(q_r || q_a)) / 2; ReduceLROnPlateau(patience 20,
              factor 0.5) on that loss; clamp eps to [-delta, delta]; stop once the lr is below 1e-6
                                                                      attack/attacker.py:37,72-93, divergence.py:36
    kept      the last iterate, clamped to the image's range                         attack/attacker.py:95
    x~        the decoder's mean at one z ~ q(z|x): one draw per attacked input, one per reference image
              shared by its restarts                                 vae/model/vae.py:185-190,390-391
    MS-SSIM   jorge-pessoa/pytorch-msssim as they vendor it: 5 scales, Wang et al.'s weights, a 14 px Gaussian
              window (sigma 1.5) shrunk to the image at coarse scales, no padding, ReLU on every term, and the
              coarsest SSIM raised to 4 x its weight       vae/model/vae.py:432-433, thirdparty/pytorch_msssim
    G_r       mean over images and restarts of MS-SSIM(x_r, x_a) - MS-SSIM(x~_r, x~_a)
                                                                       vae/model/vae.py:432-444, trainer.py:74-90

Which of these differences matter is measured, not guessed: the attacked inputs are also scored with vaegen's
MS-SSIM and/or vaegen's reconstruction (the posterior mean), so that gaps.json's `variants` separate the attack's
share of a difference between the protocols (images, start, loop, kept iterate) from the scoring's (VARIANTS).

What cannot be theirs: their VAEs see the 28x28 MNIST-type images, vaegen's see them zero-padded to 32x32
(`vaegen.data.pad_to_32`), so the attack also moves the 2 px border; MS-SSIM is taken on the central 28x28,
the pixels their images had. Their random numbers came from torch's global generator in one process; here
every restart has its own seeded stream (`vaegen.seeding`, "eval-attack-start").
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import Tensor
from tqdm.auto import tqdm

from evaluator.attack import AttackConfig, symmetric_kl
from evaluator.gaps import RobustnessResult, batches
from evaluator.msssim import ms_ssim as vaegen_ms_ssim
from vaegen.data import IMAGE_SIZE, get_spec
from vaegen.errors import VaegenError

TEST_BATCH = 1024  # run_attack.py:68: the attacked images come from the first test batch
SPLIT_SEED = 1234  # run_attack.py:27: pl.seed_everything(1234), which train_test_split's shuffle draws from
START_STD = 0.2  # attack/attacker.py:68
PLATEAU_PATIENCE, PLATEAU_FACTOR = 20, 0.5  # attack/attacker.py:73-74
MIN_RATE = 1e-6  # attack/attacker.py:91
MSSSIM_WINDOW, MSSSIM_SIGMA = 14, 1.5  # vae/model/vae.py:432; thirdparty/pytorch_msssim/__init__.py:13
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # thirdparty/pytorch_msssim/__init__.py:73
MNIST_FRAME = 28  # the side of MNIST-type images before vaegen pads them


def choose_images(labels: np.ndarray, n: int) -> np.ndarray:
    """Sorted rows of the n attacked images: class-stratified from the first 1024 (their train_test_split
    call under seed 1234; the same images as theirs when the rows are the official test set's)."""
    first = min(TEST_BATCH, len(labels))
    try:
        _, picked = train_test_split(np.arange(first), stratify=labels[:first], test_size=n,
                                     random_state=SPLIT_SEED)
    except ValueError as e:
        raise VaegenError(f"--robustness-protocol kuzina: cannot draw {n} class-stratified images from the "
                          f"first {first} test images ({e})") from None
    return np.sort(picked)


def msssim_frame(dataset: str) -> int:
    """The side of the images their code saw: 28 for MNIST-type sets (padded to 32 by vaegen.data), else 32."""
    return MNIST_FRAME if get_spec(dataset).format == "idx" else IMAGE_SIZE


# --- the attack --------------------------------------------------------------------------------------------

def average_symmetric_kl(mean_a, logvar_a, mean_b, logvar_b) -> Tensor:
    """Their gaus_skl summed over latents: (KL(a || b) + KL(b || a)) / 2 (utils/divergence.py:36-49)."""
    return symmetric_kl(mean_a, logvar_a, mean_b, logvar_b) / 2


def start_noise(shape, generator: torch.Generator) -> Tensor:
    """eps at the start of a restart: N(0, 0.2^2) per pixel (attack/attacker.py:66-68)."""
    return torch.randn(shape, generator=generator, device=generator.device) * START_STD


def _learning_rate_schedule(rate: float) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """torch's own ReduceLROnPlateau as they configure it, on a placeholder optimizer that only holds the lr."""
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=rate)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(holder, patience=PLATEAU_PATIENCE, factor=PLATEAU_FACTOR)


def attack(vae, x_ref: Tensor, eps: Tensor, config: AttackConfig) -> Tensor:
    """Their AttackVAE.train_eps (attack/attacker.py:65-95, unsupervised) for a batch of restarts: row b is one
    restart of image x_ref[b] from perturbation eps[b]; rows are independent (each its own lr schedule).
    Returns the last iterate, x_r + eps clamped to the reference image's own range."""
    low = x_ref.amin(dim=(1, 2, 3), keepdim=True)  # :75 mi, ma = x_ref.min(), x_ref.max()
    high = x_ref.amax(dim=(1, 2, 3), keepdim=True)
    with torch.no_grad():
        mean_r, logvar_r = vae.encode(x_ref)
    schedules = [_learning_rate_schedule(config.step_size) for _ in range(len(x_ref))]
    rate = torch.full((len(x_ref), 1, 1, 1), float(config.step_size), device=x_ref.device)
    stopped = torch.zeros(len(x_ref), 1, 1, 1, dtype=torch.bool, device=x_ref.device)
    for _ in range(config.iterations):
        before = eps
        eps = torch.clamp(x_ref + eps, low, high) - x_ref  # :77
        x = (x_ref + eps).requires_grad_(True)  # :79
        loss = -average_symmetric_kl(*vae.encode(x), mean_r, logvar_r)  # :37, :80
        (grad,) = torch.autograd.grad(loss.sum(), x)  # :81; the rows are independent, so per-row gradients
        eps = eps - rate * grad  # :82 SGD
        for schedule, value, done in zip(schedules, loss.detach().tolist(), stopped.view(-1).tolist()):
            if not done:
                schedule.step(value)  # :83
        rate = torch.tensor([s.optimizer.param_groups[0]["lr"] for s in schedules], device=x_ref.device)
        rate = rate.view(-1, 1, 1, 1)
        eps = torch.clamp(eps, -config.delta, config.delta)  # :86-87
        eps = torch.where(stopped, before, eps)
        stopped |= rate < MIN_RATE  # :91-93: that restart breaks out of its loop
    return torch.clamp(x_ref + eps, low, high).detach()  # :95


def sampled_reconstruction(vae, x: Tensor, noise: Tensor) -> Tensor:
    """Their x~: the decoder's mean at z = mean + std * noise, one z ~ q(z|x) (vae/model/vae.py:152-155,185-190)."""
    mean, logvar = vae.encode(x)
    return vae.likelihood.mean(vae.decode(mean + torch.exp(0.5 * logvar) * noise))


# --- MS-SSIM, as their thirdparty/pytorch_msssim computes it ------------------------------------------------

def _window(size: int, channels: int) -> Tensor:
    """Their create_window: a normalized Gaussian (sigma 1.5) centred on index size // 2, which for an even
    size sits half a pixel off the middle (:7-16)."""
    gauss = torch.tensor([math.exp(-(i - size // 2) ** 2 / float(2 * MSSSIM_SIGMA**2)) for i in range(size)])
    gauss = (gauss / gauss.sum()).unsqueeze(1)
    return gauss.mm(gauss.t()).expand(channels, 1, size, size).contiguous()


def _ssim_terms(a: Tensor, b: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    """Per-image SSIM and contrast-structure term at one scale, their ssim() with no padding (:19-68)."""
    channels, height, width = a.shape[1:]
    window = _window(min(MSSSIM_WINDOW, height, width), channels).to(a.device)
    mu1, mu2 = F.conv2d(a, window, groups=channels), F.conv2d(b, window, groups=channels)
    mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
    sigma1_sq = F.conv2d(a * a, window, groups=channels) - mu1_sq
    sigma2_sq = F.conv2d(b * b, window, groups=channels) - mu2_sq
    sigma12 = F.conv2d(a * b, window, groups=channels) - mu1_mu2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    v1, v2 = 2.0 * sigma12 + c2, sigma1_sq + sigma2_sq + c2
    ssim_map = ((2 * mu1_mu2 + c1) * v1) / ((mu1_sq + mu2_sq + c1) * v2)
    return ssim_map.mean(dim=(1, 2, 3)), (v1 / v2).mean(dim=(1, 2, 3))


def central(x: Tensor, frame: int) -> Tensor:
    """The central frame x frame pixels of (B, C, H, W) images."""
    top, left = (x.shape[-2] - frame) // 2, (x.shape[-1] - frame) // 2
    return x[..., top:top + frame, left:left + frame]


def ms_ssim(a: Tensor, b: Tensor, frame: int | None = None) -> Tensor:
    """Their msssim(a, b, 14, normalize='relu') (:71-106) per image pair of (B, C, H, W) in [0, 1] -> (B,), on
    the central `frame` pixels when given. Their data range is read off the image, 1 for pixels in [0, 1]."""
    if frame is not None:
        a, b = central(a, frame), central(b, frame)
    a, b = a.float(), b.float()
    ssims, contrasts = [], []
    for _ in MSSSIM_WEIGHTS:
        ssim, contrast = _ssim_terms(a, b, data_range=1.0)
        ssims.append(torch.relu(ssim))
        contrasts.append(torch.relu(contrast))
        if a.shape[-1] > 1:
            a, b = F.avg_pool2d(a, (2, 2)), F.avg_pool2d(b, (2, 2))
    weights = torch.tensor(MSSSIM_WEIGHTS, device=a.device).unsqueeze(1)
    contrast_terms, ssim_terms = torch.stack(contrasts) ** weights, torch.stack(ssims) ** weights
    # their torch.prod(pow1[:-1] * pow2[-1]) (:105): the coarsest SSIM term multiplies each of the four finer
    # contrast terms, so it enters to the power 4 x 0.1333 (Wang et al.'s MS-SSIM: once).
    return (contrast_terms[:-1] * ssim_terms[-1]).prod(0)


def describe(frame: int) -> dict:
    """What gaps.json records about this protocol."""
    return {
        "images": f"class-stratified from the first {TEST_BATCH} evaluated test images, sklearn "
                  f"train_test_split seed {SPLIT_SEED}",
        "start": f"eps ~ N(0, {START_STD}^2) per pixel", "kept_iterate": "last",
        "pixel_range": "the reference image's [min, max]",
        "objective": "(KL(q_a || q_r) + KL(q_r || q_a)) / 2, SGD with ReduceLROnPlateau "
                     f"(patience {PLATEAU_PATIENCE}, factor {PLATEAU_FACTOR})",
        "reconstruction": "decoder mean at one z ~ q(z|x)",
        "msssim_config": {
            "implementation": "evaluator.kuzina.ms_ssim (Kuzina et al.'s thirdparty/pytorch_msssim)",
            "scales": len(MSSSIM_WEIGHTS), "weights": list(MSSSIM_WEIGHTS), "window_size": MSSSIM_WINDOW,
            "sigma": MSSSIM_SIGMA, "padding": 0, "data_range": 1.0, "normalize": "relu",
            "coarsest_ssim_exponent": (len(MSSSIM_WEIGHTS) - 1) * MSSSIM_WEIGHTS[-1], "frame": frame,
        },
    }


# --- the gap -----------------------------------------------------------------------------------------------

# Which of the protocols' differences move G_r: the attacked inputs of this protocol (its images, start, loop
# and kept iterate) scored with each mix of the two MS-SSIMs and the two reconstructions. (MS-SSIM, x~) -> the
# variant's name in gaps.json; theirs, sampled is this protocol itself.
VARIANTS = {("theirs", "sampled"): None,
            ("vaegen", "mean"): "attack",
            ("theirs", "mean"): "attack+msssim",
            ("vaegen", "sampled"): "attack+reconstruction"}


def robustness_gap(vae, x_ref: Tensor, config: AttackConfig, seeds: list[int], frame: int | None = None,
                   batch_size: int = 1000, progress: bool = True) -> RobustnessResult:
    """Attack every image once per seed (their restarts) and score each attacked input as their eval_attack,
    and also by each mix of MS-SSIMs and reconstructions in VARIANTS (no extra random numbers: the posterior mean
    draws none, and the sampled reconstructions are those of their scoring).

    Restart i draws everything from its own generator (seed seeds[i]), in this order: its start noise for all
    images, then the z ~ q of its attacked inputs' reconstructions. The reference images' reconstructions (one
    z per image, shared by its restarts as in their code) are drawn after those, from restart 0's generator.
    """
    generators = [torch.Generator(device=x_ref.device).manual_seed(seed) for seed in seeds]
    eps = torch.cat([start_noise(x_ref.shape, g) for g in generators])
    x_rep = x_ref.repeat(len(seeds), *[1] * (x_ref.dim() - 1))
    desc = "kuzina attack" if progress else None
    x_adv = torch.cat([attack(vae, x_rep[sl], eps[sl], config) for sl in batches(len(x_rep), batch_size, desc)])
    latent = (len(x_ref), vae.latent_dim)
    adv_noise = torch.cat([torch.randn(latent, generator=g, device=x_ref.device) for g in generators])
    ref_noise = torch.randn(latent, generator=generators[0], device=x_ref.device)
    with torch.no_grad():
        rec_ref = torch.cat([sampled_reconstruction(vae, x_ref[sl], ref_noise[sl])
                             for sl in batches(len(x_ref), batch_size)]).repeat(len(seeds), 1, 1, 1)
        scores = defaultdict(list)  # (MS-SSIM, x~) -> [(MS-SSIM(x_r, x_a), MS-SSIM(x~_r, x~_a)) per batch]
        skl = []
        for sl in tqdm(list(batches(len(x_rep), batch_size)), desc="kuzina scores", leave=False,
                       disable=not progress):
            x, x_a = x_rep[sl], x_adv[sl]
            reconstructions = {"sampled": (rec_ref[sl], sampled_reconstruction(vae, x_a, adv_noise[sl])),
                               "mean": (vae.reconstruct(x), vae.reconstruct(x_a))}
            similarity = {"theirs": lambda a, b: ms_ssim(a, b, frame), "vaegen": vaegen_ms_ssim}
            for (measure, recon), _ in VARIANTS.items():
                scores[measure, recon].append((similarity[measure](x, x_a),
                                               similarity[measure](*reconstructions[recon])))
            skl.append(symmetric_kl(*vae.encode(x_a), *vae.encode(x)))
    shape = (len(seeds), len(x_ref))

    def joined(key):
        return tuple(torch.cat([batch[i] for batch in scores[key]]).view(shape) for i in (0, 1))

    return RobustnessResult(*joined(("theirs", "sampled")), torch.cat(skl).view(shape),
                            variants={name: joined(key) for key, name in VARIANTS.items() if name})
