"""The paper's Aug.Naive and Aug.Tuned baselines: ADA-style augmentation of uint8 image batches.

Semantics follow StyleGAN2-ADA (Karras et al. 2020) and its successor in EDM (Karras et al. 2022,
NVlabs/edm `training/augment.py`), whose parameter names the paper's Tables 8-10 use (EDM is where
"anisotropic rotation with probability p" and `yflip` come from):

- Each op is applied to each image independently with probability `p`, except ops whose table entry gives
  its own probability (`xflip` in Table 10: 1; `aniso_rotate`: 0.5 or 0.4, as EDM's `aniso_rotate_prob`,
  not scaled by `p`). Ops with their own probability keep it at `p=0`.
- All geometric ops of an image are composed into one 3x3 matrix (pixel coordinates about the image centre)
  and the image is resampled once: repeated resampling visibly blurs 32x32 images. Order as in ADA: flips,
  integer translation, isotropic scaling, rotation, anisotropic scaling.
- Resampling is bilinear `grid_sample` with `padding_mode="reflection", align_corners=True`, which mirrors
  about the centres of the edge pixels: the same as ADA's `F.pad(mode="reflect")` (edge pixel not
  repeated) and EDM's integer-translation blit, without a padding margin to size. ADA's 2x-upsampled
  anti-aliased resampling is not reproduced; integer shifts and flips alone stay exact. kornia's
  `warp_affine` would wrap the same two torch calls, so we call torch directly.
- Colour ops, as in ADA, form one 4x4 matrix per image applied once, in ADA's [-1, 1] pixel units:
  brightness adds N(0, std^2) (std 0.2 = 25.5 grey levels), contrast scales about mid-grey (ADA's 0; ADA
  does not lerp about the image mean), hue rotates about the grey axis, saturation scales away from it.
  Hue and saturation are exactly identity on 1-channel images (ADA's grey rule), so `augmentation_ops`
  leaves them out for grey datasets.
- Randomness comes only from the per-batch seed (a torch.Generator on the images' device; the global RNG is
  untouched), so a run and its resume are reproducible on the same kind of device.

Readings of the tables (flag-able where the paper is ambiguous):
- "2^sigma, sigma in [0, s]" (scale, aniso, contrast, saturation) and brightness "sigma in [0, s]":
  `sigma_reading="std"` (default, ADA's meaning): the log2 factor (brightness: the offset) ~ N(0, s^2).
  `"range"`: per image, sigma ~ U(0, s), then N(0, sigma^2).
- b in {0.1, 0.12}: `p`, default 0.1 for every dataset; 0.12 is the other value the paper names (and EDM's
  CIFAR-10 default).
- Translation "t in {0, 1, 2, 3} px in x and y": an integer shift uniform over -3..3 px, x and y drawn
  independently (ADA rounds a uniform draw instead, which halves the end values' weight).
- Rotation "d degrees": angle uniform in [-d, d] (d = 360 is the full circle). Hue "r in [0, 0.25 pi]":
  angle uniform in [-45, 45] degrees. `aniso_rotate`: the stretch axis is rotated by an angle uniform over
  the full circle (R(t) S R(t)^T, area preserved), as in EDM; without it the stretch is along x/y.
- Flips: when applied, a flip mirrors the image with probability 1/2 (`flip_reading="ada"`, default: ADA
  and EDM draw `randint(2)`). So Table 10's "horizontal flip applied with probability 1" (as printed) is
  the ordinary random flip of half the images, which is what EDM's CIFAR-10 config (`xflip=1e8`) does.
  `flip_reading="always"`: an applied flip always mirrors, so Table 10 mirrors every image.
- Table 10 lists no translation (EDM's CIFAR-10 config has fractional translation); we follow the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vaegen.errors import VaegenError


@dataclass(frozen=True)
class Op:
    """What the code needs to know about an op besides how it draws (`Augmenter._draw`)."""

    kind: str                 # "geometric" | "colour" | "modifier": changes how another op draws, nothing alone
    defaults: dict            # Table 8's parameters; an op given by name alone gets these
    facts: dict = field(default_factory=dict)  # fixed properties of our implementation, recorded in config.json
    sized_by_normal: bool = False  # its size is a N(0, s^2) draw, so `sigma_reading` applies
    modifies: str | None = None    # a modifier's op, which must be in the same set


RESAMPLED = {"resample": "once per image, bilinear, reflect about edge pixel centres"}
OP_SPECS: dict[str, Op] = {  # in order of application
    "xflip": Op("geometric", {}, RESAMPLED),
    "yflip": Op("geometric", {}, RESAMPLED),
    "translate": Op("geometric", {"max_px": 3}, {"integer": True, **RESAMPLED}),
    "scale": Op("geometric", {"log2_std": 0.2}, RESAMPLED, sized_by_normal=True),
    "rotate": Op("geometric", {"max_deg": 10.0}, RESAMPLED),
    "aniso": Op("geometric", {"log2_std": 0.2}, RESAMPLED, sized_by_normal=True),
    # EDM's aniso_rotate_prob: turns the stretch axis of aniso by a uniform angle (max_deg: the full circle)
    "aniso_rotate": Op("modifier", {"probability": 0.5}, {"max_deg": 180.0, **RESAMPLED}, modifies="aniso"),
    "brightness": Op("colour", {"std": 0.2}, {"units": "[-1, 1] pixel range"}, sized_by_normal=True),
    "contrast": Op("colour", {"log2_std": 0.25}, {"centre": "mid-grey"}, sized_by_normal=True),
    "hue": Op("colour", {"max_deg": 45.0}),
    "saturation": Op("colour", {"log2_std": 0.5}, sized_by_normal=True),
}
OPS = tuple(OP_SPECS)  # also the order of application
SIGMA_READINGS = ("std", "range")
FLIP_READINGS = ("ada", "always")
OUTPUTS = ("uint8", "float")
DEFAULTS = {name: spec.defaults for name, spec in OP_SPECS.items()}
NAIVE = tuple({"name": name} for name in OPS if name != "yflip")  # Table 8, all datasets
TUNED_MNIST_LIKE = (  # Table 9: binary-mnist, mnist, fmnist
    {"name": "translate", "max_px": 3},
    {"name": "scale", "log2_std": 0.15},
    {"name": "rotate", "max_deg": 10.0},
    {"name": "aniso", "log2_std": 0.15},
    {"name": "aniso_rotate", "probability": 0.4},
)
TUNED = {
    "binary-mnist": TUNED_MNIST_LIKE,
    "mnist": TUNED_MNIST_LIKE,
    "fmnist": TUNED_MNIST_LIKE,
    "cifar10": (  # Table 10
        {"name": "xflip", "probability": 1.0},
        {"name": "yflip"},
        {"name": "scale", "log2_std": 0.2},
        {"name": "rotate", "max_deg": 360.0},
        {"name": "aniso", "log2_std": 0.2},
        {"name": "aniso_rotate", "probability": 0.5},
    ),
}


def resolve_op(op: str | dict) -> dict:
    """An op name or partial dict -> the full dict {"name": ..., parameters}, missing ones from Table 8."""
    op = {"name": op} if isinstance(op, str) else dict(op)
    name = op.get("name")
    if name not in DEFAULTS:
        raise VaegenError(f"unknown augmentation op {name!r}; choose from {', '.join(OPS)}")
    allowed = {"name", "probability", *DEFAULTS[name]}
    if unknown := set(op) - allowed:
        raise VaegenError(f"augmentation op {name!r} has no parameter(s) {', '.join(sorted(unknown))}")
    op = {"name": name, **DEFAULTS[name], **op}
    values = [value for key, value in op.items() if key != "name"]
    if (any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values)
            or op.get("probability", 0) > 1 or not isinstance(op.get("max_px", 0), int)):
        raise VaegenError(f"augmentation op {name!r} needs numbers >= 0, a probability <= 1 and whole "
                          f"pixels: {op}")
    return op


def augmentation_ops(kind: str, dataset: str, channels: int) -> tuple[dict, ...]:
    """The resolved op list of the paper's `naive` (Table 8) or `tuned` (Tables 9, 10) set for a dataset."""
    if dataset not in TUNED:
        raise VaegenError(f"no augmentation sets for dataset {dataset!r}; choose from {', '.join(TUNED)}")
    if kind not in ("naive", "tuned"):
        raise VaegenError(f"unknown augmentation {kind!r}; choose naive or tuned")
    ops = NAIVE if kind == "naive" else TUNED[dataset]
    return tuple(resolve_op(op) for op in ops if channels == 3 or op["name"] not in ("hue", "saturation"))


def affine2d(a, b, c, d, tx, ty) -> torch.Tensor:
    """Per-image (n,) entries -> (n, 3, 3) homogeneous matrices [[a, b, tx], [c, d, ty], [0, 0, 1]]."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=-1).view(-1, 3, 3)


def rotation2d(theta: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(theta)
    return affine2d(theta.cos(), -theta.sin(), theta.sin(), theta.cos(), zero, zero)


def scaling2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(sx)
    return affine2d(sx, zero, zero, sy, zero, zero)


class Draws:
    """Per-image random draws (n of each) from one generator. Their order is part of the output bytes: every
    op draws the same way whether or not it is applied, and ops draw in the order of `OPS`."""

    def __init__(self, augmenter: Augmenter, n: int, generator: torch.Generator, device: torch.device):
        self.augmenter, self.n, self.generator, self.device = augmenter, n, generator, device
        self.one, self.zero = torch.ones(n, device=device), torch.zeros(n, device=device)

    def uniform(self, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(self.n, generator=self.generator, device=self.device) * (high - low) + low

    def applied(self, name: str) -> torch.Tensor:
        return self.uniform() < self.augmenter.probability(name)

    def normal(self, name: str, key: str) -> torch.Tensor:
        """The op's N(0, sigma^2) draw (sigma: its parameter `key`, per `sigma_reading`), 0 where not applied."""
        sigma = self.augmenter.ops[name][key] * (self.uniform() if self.augmenter.sigma_reading == "range" else 1.0)
        return torch.randn(self.n, generator=self.generator, device=self.device) * sigma * self.applied(name)


class Augmenter:
    """uint8 (B, C, H, W) -> the augmented batch, same shape and device, seeded per call: uint8, rounded and
    clamped to [0, 255] like a stored image (`output="uint8"`), or float32 in the model's [0, 1] pixel units,
    neither rounded nor clamped, as StyleGAN2-ADA's pipeline leaves it (`output="float"`)."""

    def __init__(self, ops, p: float = 0.1, image_size: int = 32, sigma_reading: str = "std",
                 flip_reading: str = "ada", output: str = "uint8"):
        if not 0 <= p <= 1:
            raise VaegenError(f"augmentation probability must be in [0, 1], got {p}")
        if output not in OUTPUTS:
            raise VaegenError(f"augmentation output must be one of {OUTPUTS}, got {output!r}")
        if sigma_reading not in SIGMA_READINGS or flip_reading not in FLIP_READINGS:
            raise VaegenError(f"sigma_reading must be one of {SIGMA_READINGS} (got {sigma_reading!r}), "
                              f"flip_reading one of {FLIP_READINGS} (got {flip_reading!r})")
        resolved = [resolve_op(op) for op in ops]
        by_name = {op["name"]: op for op in resolved}
        if len(by_name) != len(resolved):
            raise VaegenError(f"augmentation ops listed twice: {[op['name'] for op in resolved]}")
        for name in by_name:
            if (target := OP_SPECS[name].modifies) and target not in by_name:
                raise VaegenError(f"{name} changes how {target} draws; add the {target} op")
        self.p, self.image_size = p, image_size
        self.sigma_reading, self.flip_reading = sigma_reading, flip_reading
        self.mirror_probability = 0.5 if flip_reading == "ada" else 1.0
        self.output = output
        self.ops = {name: by_name[name] for name in OPS if name in by_name}  # in order of application

    def probability(self, name: str) -> float:
        return self.ops[name].get("probability", self.p) if name in self.ops else 0.0

    def describe(self) -> list[dict]:
        """Every parameter that determines the output, one JSON-ready dict per op (for config.json)."""
        entries = []
        for name, op in self.ops.items():
            spec = OP_SPECS[name]
            params = {key: value for key, value in op.items() if key not in ("name", "probability")}
            entry = {"name": name, "probability": self.probability(name), **params}
            if name in ("xflip", "yflip"):
                entry["mirror_probability"] = self.mirror_probability
            if spec.sized_by_normal:
                entry["sigma_reading"] = self.sigma_reading
            entries.append({**entry, **spec.facts})
        return entries

    def matrices(self, n: int, seed: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The per-image matrices a call with this seed uses: geometric (n, 3, 3), mapping input pixel
        positions (about the image centre) to output ones, and colour (n, 4, 4) on [-1, 1] RGB."""
        generator = torch.Generator(device).manual_seed(seed)
        return self._draw(n, generator, torch.device(device))

    def _draw(self, n: int, generator: torch.Generator, device: torch.device):
        draw = Draws(self, n, generator, device)
        geometric = torch.eye(3, device=device).expand(n, 3, 3)
        colour = torch.eye(4, device=device).expand(n, 4, 4)
        for name in self.ops:
            kind = OP_SPECS[name].kind
            if kind == "geometric":
                geometric = getattr(self, f"_{name}")(draw) @ geometric
            elif kind == "colour":
                step = torch.eye(4, device=device).repeat(n, 1, 1)
                getattr(self, f"_{name}")(draw, step[:, :3])  # fills the step's rows in place
                colour = step @ colour
        return geometric, colour

    # --- geometric ops: per-image 3x3 matrices on pixel positions about the image centre ---------------------

    def _flip(self, draw: Draws, name: str) -> torch.Tensor:
        return 1 - 2 * (draw.applied(name) & (draw.uniform() < self.mirror_probability)).float()

    def _xflip(self, draw):
        return scaling2d(self._flip(draw, "xflip"), draw.one)

    def _yflip(self, draw):
        return scaling2d(draw.one, self._flip(draw, "yflip"))

    def _translate(self, draw):
        max_px = self.ops["translate"]["max_px"]
        shift = torch.randint(-max_px, max_px + 1, (2, draw.n), generator=draw.generator, device=draw.device)
        shift = (shift * draw.applied("translate")).float()
        return affine2d(draw.one, draw.zero, draw.zero, draw.one, shift[0], shift[1])

    def _scale(self, draw):
        s = draw.normal("scale", "log2_std").exp2()
        return scaling2d(s, s)

    def _rotate(self, draw):
        max_rad = math.radians(self.ops["rotate"]["max_deg"])
        return rotation2d(draw.uniform(-max_rad, max_rad) * draw.applied("rotate"))

    def _aniso(self, draw):  # area-preserving stretch; aniso_rotate turns its axis
        s = draw.normal("aniso", "log2_std").exp2()
        axis = draw.uniform(-math.pi, math.pi) * draw.applied("aniso_rotate")
        return rotation2d(axis) @ scaling2d(s, 1 / s) @ rotation2d(-axis)

    # --- colour ops: the (n, 3, 4) rows [RGB matrix | offset] of a 4x4 matrix on [-1, 1] RGB ------------------

    def _brightness(self, draw, rows):
        rows[:, :, 3] = draw.normal("brightness", "std")[:, None]

    def _contrast(self, draw, rows):
        rows[:, :, :3] *= draw.normal("contrast", "log2_std").exp2()[:, None, None]

    def _hue(self, draw, rows):  # Rodrigues rotation about the grey axis
        max_rad = math.radians(self.ops["hue"]["max_deg"])
        theta = (draw.uniform(-max_rad, max_rad) * draw.applied("hue"))[:, None, None]
        cross = torch.tensor([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]], device=draw.device) * 3 ** -0.5
        along, across = grey_projections(draw.device)
        rows[:, :, :3] = along + theta.cos() * across + theta.sin() * cross

    def _saturation(self, draw, rows):
        s = draw.normal("saturation", "log2_std").exp2()[:, None, None]
        along, across = grey_projections(draw.device)
        rows[:, :, :3] = along + s * across

    def __call__(self, images_u8: torch.Tensor, seed: int) -> torch.Tensor:
        n, channels, height, width = images_u8.shape
        if images_u8.dtype != torch.uint8 or (height, width) != (self.image_size, self.image_size):
            raise VaegenError(f"augmentation expects uint8 (B, C, {self.image_size}, {self.image_size}) "
                              f"images, got {images_u8.dtype} {tuple(images_u8.shape)}")
        if channels not in (1, 3):
            raise VaegenError(f"augmentation handles 1- or 3-channel images, got {channels}")
        active = {OP_SPECS[name].kind for name in self.ops if self.probability(name) > 0} - {"modifier"}
        if not active:
            return images_u8.float() / 255 if self.output == "float" else images_u8.clone()
        generator = torch.Generator(images_u8.device).manual_seed(seed)
        geometric, colour = self._draw(n, generator, images_u8.device)
        x = images_u8.float() / 127.5 - 1  # ADA's pixel range; colour parameters are in these units

        if "geometric" in active:
            # Output pixel -> input pixel in grid_sample's coordinates (+-1: edge pixel centres).
            half = torch.tensor([(width - 1) / 2, (height - 1) / 2, 1.0], device=x.device)
            theta = torch.diag(1 / half) @ torch.linalg.inv_ex(geometric).inverse @ torch.diag(half)
            grid = F.affine_grid(theta[:, :2], list(x.shape), align_corners=True)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)

        if "colour" in active:
            pixels = x.flatten(2)
            if channels == 3:
                pixels = colour[:, :3, :3] @ pixels + colour[:, :3, 3:]
            else:  # ADA's grey rule: the mean RGB row; hue and saturation rows sum to one, so cancel out
                rows = colour[:, :3].mean(dim=1, keepdim=True)
                pixels = pixels * rows[:, :, :3].sum(dim=2, keepdim=True) + rows[:, :, 3:]
            x = pixels.view_as(x)
        if self.output == "float":
            return (x + 1) / 2
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def grey_projections(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections of RGB onto the grey (luma) axis and onto the plane across it (3x3 each)."""
    grey = torch.full((3, 1), 3 ** -0.5, device=device)
    along = grey @ grey.T
    return along, torch.eye(3, device=device) - along
