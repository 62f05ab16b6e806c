"""Load any diffusion model as p_DM and sample it: the sampling core shared by `dm sample` and `generate`.

Models. `load_dm` accepts a directory written by `vaegen dm train`, any diffusers `UNet2DModel` directory with
its scheduler config beside it (or in ../scheduler), an unconditional diffusers pipeline directory (unet/ +
scheduler/), or a hub id when online. How the UNet is called is read from the scheduler config, never
assumed: an EDM scheduler (EDMEulerScheduler / EDMDPMSolverMultistepScheduler) means EDM preconditioning; a
DDPM-family scheduler (DDPM, DDIM, PNDM, DPM-Solver, ...) means a discrete-time VP model with its betas and
prediction type (epsilon, v_prediction or sample). Either way the model becomes an EDM denoiser D(x; sigma)
in the coordinates x = x_t / alpha_t, sigma = sigma_t / alpha_t, which is all the Heun sampler needs.

Samplers. All are deterministic and run the Karras sigma schedule (rho = 7) over the model's own sigma range,
ending at sigma = 0; `steps` N costs N network evaluations except for edm-heun.
  edm-heun        EDM Algorithm 1 with S_churn = 0 (deterministic 2nd-order Heun on the probability-flow ODE);
                  N steps cost 2N - 1 evaluations (18 -> 35).
  dpm-solver++    diffusers' multistep DPM-Solver++, 2nd order: EDMDPMSolverMultistepScheduler for EDM models,
                  DPMSolverMultistepScheduler (Karras sigmas) for VP models.
  dpm-solver++3m  the same at 3rd order ("DPM++ 3M").
  unipc           diffusers' UniPCMultistepScheduler, bh2, order 3 (its advice for unconditional sampling).
                  It exists only in VP form, so for every model it runs on the EDM denoiser: the VP state is
                  x / sqrt(1 + sigma^2) and, with prediction_type="sample", the model output is D(x; sigma).
  ddim            deterministic DDIM (eta = 0), Euler's method on the probability-flow ODE in (x / alpha, sigma)
                  coordinates (Song et al. 2021; Karras et al. 2022, sec. 3): diffusers' EDMEulerScheduler for
                  EDM models; for VP models first-order DPM-Solver++, which is the same update (Lu et al. 2022)
                  and, unlike diffusers' DDIMScheduler, runs on Karras sigmas.

Noise. Sample i's initial noise is a pure function of (seed, i) and the image shape, so an image never
depends on the batch, the process count or the device it was sampled with. Two schemes exist; a shard run
records which one made it (`noise_stream`) and is always resumed with it:
  philox (NOISE_PHILOX, the default since v2) counter-based, evaluated for a whole batch at once. The bits
                  are Philox4x64-10 (Salmon et al. 2011, numpy's `np.random.Philox`, checked against the
                  Random123 known answers) under the key (seed, id of the "sample-noise" seed purpose): image i
                  owns counter blocks [i*B, (i+1)*B), B = ceil(D/8) for D = C*H*W values, so a run of
                  consecutive images is one `random_raw` call. Word k of an image (64 bits) gives u1 (its high
                  32 bits) and u2 (low 32), each (b + 0.5) / 2^32 in (0, 1), and the Box-Muller pair
                  z[k] = r cos(2 pi u2), z[k + D/2] = r sin(2 pi u2), r = sqrt(-2 ln u1). The bits are made
                  on the CPU (exact integers everywhere); the transform runs in float64 on the sampling device
                  (CUDA) or the CPU and is rounded to float32, so CPU and CUDA agree bit for bit except where
                  their float64 log/cos/sin differ by an ulp right at a float32 rounding boundary (about one
                  value in 10^8-10^9).
  per-image generator (NOISE_PER_IMAGE_GENERATOR, "v1") a CPU `torch.Generator` seeded by (seed, i) per
                  image (`vaegen.seeding`): ~40 us per image, kept only so that runs made with it resume.

Determinism. Every sampler is deterministic after the noise, and the network always runs on fixed-shape
chunks of `SamplerConfig.chunk` images, padding the last one. The padding matters: CPU kernels (oneDNN
convolutions, MKL GEMM) choose their algorithm by batch size, so without it an image's last bits would depend
on how many images were sampled beside it. With it, `sample(dm, [5], ...)` equals
`sample(dm, [3, 4, 5], ...)[2]` bit for bit on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from tqdm.auto import tqdm

from vaegen import dmrun
from vaegen.errors import VaegenError
from vaegen.provenance import sha256_file
from vaegen.seeding import PURPOSES, torch_generator
from vaegen.shardformat import LEGACY_NOISE_STREAM

SAMPLERS = ("edm-heun", "dpm-solver++", "dpm-solver++3m", "unipc", "ddim")
SOLVER_ORDER = {"ddim": 1, "dpm-solver++": 2, "dpm-solver++3m": 3}  # the scheduler-loop samplers
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "edm-heun"          # one of SAMPLERS
    steps: int = 18                 # edm-heun: 18 steps = 35 network evaluations (the paper's setting)
    sigma_min: float | None = None  # None: the model's own range (EDM: from its scheduler config, 0.002..80)
    sigma_max: float | None = None
    rho: float = 7.0                # Karras schedule exponent of edm-heun (diffusers' schedulers use 7)
    chunk: int = 64                 # images per network call; fixed so images do not depend on the batch

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise VaegenError(f"unknown sampler {self.name!r}; choose one of {', '.join(SAMPLERS)}")
        if self.steps < 1 or self.chunk < 1:
            raise VaegenError(f"sampler steps and chunk must be >= 1, got steps={self.steps} chunk={self.chunk}")

    @property
    def network_evaluations(self) -> int:
        """Network evaluations per image (what sampling time is proportional to)."""
        return 2 * self.steps - 1 if self.name == "edm-heun" else self.steps


class DiffusionModel:
    """A UNet plus how to call it, as read from its scheduler config (see the module docstring)."""

    def __init__(self, unet: UNet2DModel, scheduler_config: dict, path: str, sha256: str):
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.path = path
        self.sha256 = sha256
        self.channels = int(unet.config.in_channels)
        self._sigmas: dict[SamplerConfig, list[float]] = {}  # Karras schedules, built once per sampler config
        self._edm_constants: dict[tuple, tuple] = {}  # preconditioning per (sigma, device, dtype)
        size = unet.config.sample_size
        self.image_size = int(size if isinstance(size, int) else size[0])
        scheduler_class = self.scheduler_config.get("_class_name", "")
        self.kind = "edm" if scheduler_class in EDM_SCHEDULERS else "vp"
        if self.kind == "edm":
            self.edm = EDMEulerScheduler.from_config(self.scheduler_config)
            if self.edm.config.prediction_type not in ("epsilon", "v_prediction"):
                raise VaegenError(f"{path}: EDM prediction type {self.edm.config.prediction_type!r} "
                                  "is not supported (epsilon or v_prediction)")
            self.prediction_type = self.edm.config.prediction_type
            self.sigma_min = float(self.edm.config.sigma_min)
            self.sigma_max = float(self.edm.config.sigma_max)
        else:
            try:
                ddpm = DDPMScheduler.from_config(self.scheduler_config)
            except (ValueError, NotImplementedError, TypeError) as e:
                raise VaegenError(f"{path}: cannot read the noise schedule of {scheduler_class} ({e})") from None
            self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
            if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
                raise VaegenError(f"{path}: unknown prediction type {self.prediction_type!r}")
            alphas_cumprod = ddpm.alphas_cumprod.double()
            # sigma_t / alpha_t of each training timestep, increasing with t.
            self.vp_log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log().numpy()
            self.sigma_min = float(np.exp(self.vp_log_sigmas[0]))
            self.sigma_max = float(np.exp(self.vp_log_sigmas[-1]))

    def describe(self) -> dict:
        """What a sample's provenance records about the model that made it."""
        return {"path": self.path, "sha256": self.sha256, "kind": self.kind,
                "prediction_type": self.prediction_type,
                "scheduler": self.scheduler_config.get("_class_name"),
                "channels": self.channels, "image_size": self.image_size}

    def edm_constants(self, sigma: float, device: torch.device) -> tuple:
        """(c_in, c_skip, c_out, c_noise) of diffusers' EDM preconditioning at `sigma`, from its own functions on
        0-d float32 tensors exactly as `edm_denoise` gets them, computed once per sigma: each is ~5 tiny tensor
        ops per network call otherwise, which cost more than a null network's whole sample on a CPU."""
        key = (sigma, device, self.unet.dtype)
        if key not in self._edm_constants:
            s = torch.tensor(sigma, dtype=torch.float32, device=device)
            one, zero = torch.ones_like(s), torch.zeros_like(s)
            self._edm_constants[key] = (
                self.edm.precondition_inputs(one, s),       # 1 * c_in
                self.edm.precondition_outputs(one, zero, s),  # c_skip * 1 + c_out * 0
                self.edm.precondition_outputs(zero, one, s),  # c_skip * 0 + c_out * 1
                self.edm.precondition_noise(s.reshape(-1)).to(self.unet.dtype))
        return self._edm_constants[key]

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """D(x; sigma): the model's estimate of the clean image, in EDM coordinates (float32).

        For an EDM model this is `edm_denoise` (c_skip x + c_out F(c_in x, c_noise)) rounded the same way, with
        the constants cached per sigma.
        """
        if self.kind == "edm":
            c_in, c_skip, c_out, c_noise = self.edm_constants(sigma, x.device)
            out = self.unet((x * c_in).to(self.unet.dtype), c_noise).sample.float()
            return (c_skip * x).add_(c_out * out)
        # VP model: x_t = alpha x, c_in = alpha = 1 / sqrt(1 + sigma^2), timestep interpolated in log sigma.
        c_in = 1.0 / (1.0 + sigma**2) ** 0.5
        t = float(np.interp(np.log(sigma), self.vp_log_sigmas, np.arange(len(self.vp_log_sigmas))))
        out = self.unet((x * c_in).to(self.unet.dtype), torch.tensor([t], device=x.device)).sample.float()
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            return x * c_in**2 - sigma * c_in * out
        return out

    def scheduler(self, name: str):
        """A fresh diffusers scheduler for a scheduler-loop sampler, configured from the model's own config."""
        order = SOLVER_ORDER[name]
        if self.kind == "edm":
            if name == "ddim":
                return EDMEulerScheduler.from_config(self.scheduler_config, final_sigmas_type="zero")
            return EDMDPMSolverMultistepScheduler.from_config(self.scheduler_config, final_sigmas_type="zero",
                                                              algorithm_type="dpmsolver++", solver_order=order)
        return DPMSolverMultistepScheduler.from_config(self.scheduler_config, algorithm_type="dpmsolver++",
                                                       solver_order=order, use_karras_sigmas=True,
                                                       final_sigmas_type="zero")


# --- loading ----------------------------------------------------------------------------------------------

def weights_sha256(unet_dir: Path) -> str:
    """sha256 of the weights file (of the sorted weight files, if sharded): stable across loads and copies."""
    files = sorted(p for p in unet_dir.iterdir()
                   if p.name in WEIGHT_FILES or re.fullmatch(r"diffusion_pytorch_model-\d+-of-\d+\.\w+", p.name))
    if not files:
        raise VaegenError(f"{unet_dir} has a UNet config but no weights file ({WEIGHT_FILES[0]})")
    digests = [sha256_file(f) for f in files]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _find_model_dirs(root: Path) -> tuple[Path, Path]:
    """(UNet directory, scheduler config file) of a DM directory of any supported layout."""
    model_index = _read_json(root / "model_index.json")
    if model_index is not None:
        unet_entry = model_index.get("unet")
        if not unet_entry or unet_entry[-1] != "UNet2DModel":
            raise VaegenError(f"{root} is a diffusers pipeline without an unconditional UNet2DModel "
                              f"(its unet is {unet_entry}); use an unconditional image pipeline")
        return root / "unet", root / "scheduler" / "scheduler_config.json"
    config = _read_json(root / "config.json")
    if config is None or config.get("_class_name") != "UNet2DModel":
        raise VaegenError(f"{root} is not a diffusion model directory (expected a `vaegen dm train` output, "
                          "a diffusers UNet2DModel directory or an unconditional pipeline directory)")
    for candidate in (root / "scheduler_config.json", root.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return root, candidate
    raise VaegenError(f"{root} has a UNet2DModel but no scheduler_config.json beside it (or in ../scheduler), "
                      "so how to call it is unknown; copy the scheduler config it was trained with there")


def _resolve(path: str) -> Path:
    """A local directory, or a hub id downloaded to the local cache (only when online)."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise VaegenError(f"{path} is a file; pass the diffusion model's directory")
        return local
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise VaegenError(f"no diffusion model at {path}; train one with `vaegen dm train`")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:  # offline, unknown repo, gated repo: all one message for the user
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise VaegenError(f"no local directory {path} and it could not be fetched as a hub id ({reason})") from None


def load_dm(path: str, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load p_DM from any supported directory (see the module docstring)."""
    root = _resolve(str(path))
    unet_dir, scheduler_file = _find_model_dirs(root)
    scheduler_config = _read_json(scheduler_file)
    if scheduler_config is None:
        raise VaegenError(f"{scheduler_file} is missing or not JSON; it says how the UNet is called")
    sha256 = weights_sha256(unet_dir)
    recorded = (dmrun.read_record(unet_dir) or {}).get("weights_sha256")
    if recorded and recorded != sha256:
        raise VaegenError(f"{unet_dir}: weights do not match dm.json (an interrupted export?); "
                          "re-run `vaegen dm train --resume` to export again")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir)
    except (OSError, ValueError, RuntimeError) as e:
        raise VaegenError(f"cannot load the UNet in {unet_dir} ({str(e).splitlines()[0]})") from None
    if unet.config.in_channels != unet.config.out_channels:
        raise VaegenError(f"{unet_dir}: UNet maps {unet.config.in_channels} to {unet.config.out_channels} "
                          "channels; an unconditional image DM maps C to C")
    return DiffusionModel(unet.to(device), scheduler_config, str(path), sha256)


# --- sampling ---------------------------------------------------------------------------------------------

NOISE_PHILOX = "vaegen sample-noise v2: philox4x64-10 (seed, i), box-muller f64"
NOISE_PER_IMAGE_GENERATOR = LEGACY_NOISE_STREAM  # "vaegen.seeding sample-noise v1"; also runs recording none
NOISE_STREAMS = (NOISE_PHILOX, NOISE_PER_IMAGE_GENERATOR)
DEFAULT_NOISE = NOISE_PHILOX
_WORD_BITS = 2.0**-32
CPU_NOISE_SLICE = 128  # images per float64 transform on a CPU (128 x 512 words x 8 bytes = 512 KiB)


def check_noise_stream(noise: str) -> str:
    if noise not in NOISE_STREAMS:
        raise VaegenError(f"unknown noise stream {noise!r}; this vaegen knows {', '.join(map(repr, NOISE_STREAMS))}")
    return noise


def contiguous_runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """(first index, length) of each run of consecutive indices, in order: [3, 4, 5, 9] -> [(3, 3), (9, 1)]."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [len(indices)]]))
    return [(int(indices[s]), int(n)) for s, n in zip(starts, lengths)]


_philox = threading.local()  # one numpy Philox per thread, re-keyed per call: constructing one costs ~25 us


def philox_words(indices: np.ndarray, seed: int, words_per_image: int) -> np.ndarray:
    """The Philox4x64-10 words (n, words_per_image) uint64 of images `indices` (see the module docstring)."""
    if not hasattr(_philox, "bits"):
        _philox.bits = np.random.Philox()
    blocks = -(-words_per_image // 4)
    key = np.array([seed, PURPOSES["sample-noise"][0]], np.uint64)
    runs = []
    for first, n in contiguous_runs(indices):
        # numpy increments the counter before each block, so block b comes from counter b - 1 (mod 2^256).
        counter = (first * blocks - 1) % 2**256
        _philox.bits.state = {"bit_generator": "Philox", "buffer": np.zeros(4, np.uint64), "buffer_pos": 4,
                              "has_uint32": 0, "uinteger": 0,
                              "state": {"key": key, "counter": np.array([(counter >> s) % 2**64 for s in
                                                                         (0, 64, 128, 192)], np.uint64)}}
        runs.append(_philox.bits.random_raw(n * blocks * 4).reshape(n, blocks * 4))
    words = runs[0] if len(runs) == 1 else np.concatenate([np.empty((0, blocks * 4), np.uint64), *runs])
    return words[:, :words_per_image] if words_per_image % 4 else words


def box_muller(words: torch.Tensor, values: int) -> torch.Tensor:
    """Standard normals (n, values) float32 from uint64 words (n, ceil(values / 2)) held as int64, in float64."""
    hi = ((words >> 32) & 0xFFFF_FFFF).to(torch.float64).add_(0.5).mul_(_WORD_BITS)  # >> is arithmetic: mask
    angle = (words & 0xFFFF_FFFF).to(torch.float64).add_(0.5).mul_(_WORD_BITS * 2 * math.pi)
    radius = hi.log_().mul_(-2.0).sqrt_().unsqueeze(1)
    pairs = torch.empty(len(words), 2, words.shape[1], dtype=torch.float64, device=words.device)
    torch.cos(angle, out=pairs[:, 0])
    torch.sin(angle, out=pairs[:, 1])
    out = torch.empty(len(words), 2, words.shape[1], dtype=torch.float32, device=words.device)
    torch.mul(pairs, radius, out=out)  # the float64 product, rounded once to float32
    return out.reshape(len(words), 2 * words.shape[1])[:, :values]


def initial_noise(indices: Sequence[int] | np.ndarray, seed: int, shape: tuple[int, int, int],
                  noise: str = DEFAULT_NOISE, device: str | torch.device = "cpu") -> torch.Tensor:
    """Standard normal noise (n, C, H, W) float32 on `device`; row i a function of (noise, seed, i, shape) only."""
    check_noise_stream(noise)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    device = torch.device(device)
    if noise == NOISE_PER_IMAGE_GENERATOR:
        rows = [torch.randn(shape, generator=torch_generator(seed, "sample-noise", int(i))) for i in indices]
        return (torch.stack(rows) if rows else torch.empty(0, *shape)).to(device)
    if len(indices) and (indices.min() < 0 or seed < 0 or seed >= 2**64):
        raise ValueError(f"noise needs indices >= 0 and a seed in [0, 2^64), got seed {seed}")
    values = math.prod(shape)
    words = torch.from_numpy(philox_words(indices, seed, -(-values // 2)).view(np.int64))
    if device.type == "cuda":
        return box_muller(words.to(device, non_blocking=True), values).reshape(len(indices), *shape)
    # On a CPU (or an accelerator without float64, MPS) in cache-sized slices: a batch's float64 temporaries
    # would be fresh allocations of several MiB, whose page faults cost more than the arithmetic.
    out = torch.empty(len(indices), values)
    for lo in range(0, len(indices), CPU_NOISE_SLICE):
        out[lo:lo + CPU_NOISE_SLICE] = box_muller(words[lo:lo + CPU_NOISE_SLICE], values)
    return out.reshape(len(indices), *shape).to(device)


def karras_sigmas(dm: DiffusionModel, config: SamplerConfig) -> torch.Tensor:
    """EDM's time steps sigma_0 > ... > sigma_{N-1} plus a final 0 (diffusers' Karras schedule), float32."""
    schedule = EDMEulerScheduler(sigma_min=config.sigma_min or dm.sigma_min,
                                 sigma_max=config.sigma_max or dm.sigma_max, rho=config.rho)
    schedule.set_timesteps(config.steps)
    return schedule.sigmas


def heun_sample(dm: DiffusionModel, noise: torch.Tensor, config: SamplerConfig) -> torch.Tensor:
    """EDM Algorithm 1, deterministic (S_churn = 0): Heun steps with an Euler step to sigma = 0 at the end.

    Per step: d = (x - D(x; s)) / s, x' = x + (s' - s) d, then (s' > 0) the correction
    x' = x + (s' - s)(0.5 d + 0.5 d'). Written in place to save allocations, each operation rounding exactly as
    that formula does (the same operands, in the same order).
    """
    if config not in dm._sigmas:
        dm._sigmas[config] = karras_sigmas(dm, config).tolist()
    sigmas = dm._sigmas[config]
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        h = sigma_next - sigma
        denoised = dm.denoise(x, sigma)
        d = torch.sub(x, denoised, out=denoised).div_(sigma)
        x_next = (h * d).add_(x)
        if sigma_next > 0:  # 2nd-order correction
            denoised = dm.denoise(x_next, sigma_next)
            d_next = torch.sub(x_next, denoised, out=denoised).div_(sigma_next)
            x_next = d.mul_(0.5).add_(d_next.mul_(0.5)).mul_(h).add_(x)
        x = x_next
    return x


def scheduler_sample(dm: DiffusionModel, noise: torch.Tensor, config: SamplerConfig) -> torch.Tensor:
    """The standard diffusers loop (scale_model_input -> UNet -> step) with the model's own scheduler type."""
    overrides = {k: v for k, v in (("sigma_min", config.sigma_min), ("sigma_max", config.sigma_max)) if v}
    scheduler = dm.scheduler(config.name)
    if overrides and dm.kind == "edm":
        scheduler = type(scheduler).from_config(scheduler.config, **overrides)
    scheduler.set_timesteps(config.steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t).to(dm.unet.dtype)
        out = dm.unet(x_in, t.reshape(1)).sample.float()
        x = scheduler.step(out, t, x).prev_sample.float()
    return x


def unipc_scheduler(dm: DiffusionModel, config: SamplerConfig) -> UniPCMultistepScheduler:
    """UniPC in VP form taking clean-image predictions, on the Karras schedule of the model's sigma range."""
    try:
        return UniPCMultistepScheduler(solver_order=3, solver_type="bh2", prediction_type="sample",
                                       use_karras_sigmas=True, final_sigmas_type="zero",
                                       sigma_min=config.sigma_min or dm.sigma_min,
                                       sigma_max=config.sigma_max or dm.sigma_max)
    except TypeError:  # sigma_min/sigma_max arrived in diffusers 0.37
        raise VaegenError("the unipc sampler needs diffusers >= 0.37 (UniPC over a given sigma range)") from None


def denoiser_sample(dm: DiffusionModel, noise: torch.Tensor, scheduler, steps: int) -> torch.Tensor:
    """A VP-form diffusers scheduler (prediction_type="sample") driven by the EDM denoiser D(x; sigma).

    At one sigma = sigma_t / alpha_t the VP state is alpha x = x / sqrt(1 + sigma^2). D is evaluated at the
    scheduler's own sigmas, so its integer timesteps play no part (hence begin index 0: they may repeat).
    """
    scheduler.set_timesteps(steps, device=noise.device)
    scheduler.set_begin_index(0)
    sigmas = scheduler.sigmas.tolist()
    x = noise * sigmas[0] / (1 + sigmas[0] ** 2) ** 0.5  # x / alpha = sigma_max * noise, as in edm-heun
    for t, sigma in zip(scheduler.timesteps, sigmas):
        denoised = dm.denoise(x * (1 + sigma**2) ** 0.5, sigma)
        x = scheduler.step(denoised, t, x).prev_sample.float()
    return x  # at sigma = 0 the two coordinates coincide


def solve(dm: DiffusionModel, noise: torch.Tensor, config: SamplerConfig) -> torch.Tensor:
    """Images (float32, about [-1, 1]) from standard normal `noise`, by the sampler `config` names."""
    if config.name == "edm-heun":
        return heun_sample(dm, noise, config)
    if config.name == "unipc":
        return denoiser_sample(dm, noise, unipc_scheduler(dm, config), config.steps)
    return scheduler_sample(dm, noise, config)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 exactly as the real data is mapped (u8 = round((x + 1) * 127.5), clamped)."""
    return (x.float() + 1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


@torch.inference_mode()
def sample(dm: DiffusionModel, indices: Sequence[int] | np.ndarray, seed: int, config: SamplerConfig,
           device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
           progress: bool = False, noise: str = DEFAULT_NOISE) -> torch.Tensor:
    """Images `indices` of the stream defined by (dm, seed, config, noise): uint8 (n, C, H, W) on CPU.

    Image i depends only on (dm, seed, i, config, noise), never on which other indices are sampled with it.
    The network runs in `dtype` (bf16 on a GPU is fine); the sampler's state stays float32.
    """
    device = torch.empty(0, device=device).device  # "cuda" -> cuda:0, so the check below is exact
    if dm.unet.device != device or dm.unet.dtype != dtype:  # .to(dtype) makes diffusers warn: only when needed
        dm.unet.to(device=device, dtype=dtype)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    shape = (dm.channels, dm.image_size, dm.image_size)
    all_noise = initial_noise(indices, seed, shape, noise, device)  # one batched draw for every chunk
    out = []
    chunks = range(0, len(indices), config.chunk)
    for start in tqdm(chunks, desc="sampling", unit="chunk", disable=not progress):
        n = min(config.chunk, len(indices) - start)
        chunk_noise = all_noise[start:start + n]
        if n < config.chunk:  # pad to the fixed chunk shape (see the module docstring)
            chunk_noise = torch.cat([chunk_noise, chunk_noise.new_zeros(config.chunk - n, *shape)])
        x = solve(dm, chunk_noise, config)
        out.append(to_uint8(x[:n]).cpu())
    return torch.cat(out) if out else torch.empty(0, *shape, dtype=torch.uint8)


def sampler_record(dm: DiffusionModel, config: SamplerConfig, seed: int, noise: str = DEFAULT_NOISE) -> dict:
    """Everything that determines a sample stream, for provenance records (generation.json, score.json)."""
    return {"sampler": asdict(config), "network_evaluations": config.network_evaluations, "seed": seed,
            "noise_stream": noise, "dm": dm.describe()}
