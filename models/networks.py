"""The segmentation network: a MONAI 3D U-Net body with two heads.

* ``voxel`` head, full resolution, 3 sigmoid channels: marrow edema, bone, growth plate (physis).
* ``sites`` head, half resolution, ``n_sites()+1`` softmax classes (0 = no bone). It reads the U-Net's
  half-resolution skip level (encoder + decoder features, twice the channels of the final map) rather than the
  pooled final feature map, which must also carry edema and bone (``sites_from``).

A 67-class head at full resolution costs more than the whole U-Net body on a CPU; bone sites are large
structures, so they are classified at half resolution and sharpened by the full-resolution bone channel.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .sites import mirror_ids, n_sites

EDEMA, BONE, PHYSIS = 0, 1, 2
VOXEL_CHANNELS = ("edema", "bone", "physis")
LOG_EPS = 0.03  # of the normalised image (body 99th percentile = 1): about background noise
# The network's parts that training can hold fixed or train alone: part -> WbmriNet's child modules
NETWORK_PARTS = {"body": ("body", "act"), "voxel": ("voxel",), "sites": ("sites",),
                 # the U-Net's last, full-resolution up block: downstream of the site head's skip level, so training
                 # it (with voxel) leaves the site logits to the bit (MONAI UNet: body.model[2])
                 "top": ("body.model.2", "act")}
NetworkPart = Literal[tuple(NETWORK_PARTS)]  # type: ignore[valid-type]


class NetworkConfig(BaseModel):
    """Architecture and input geometry: the one place that fixes the model's spacing and patch."""
    model_config = ConfigDict(extra="forbid")

    arch: Literal["unet", "basicunet"] = "unet"
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    res_units: int = Field(1, ge=0, le=4)
    features: int = Field(16, ge=4, description="channels of the shared feature map before the heads")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm: Literal["batch", "instance"] = Field(
        "batch", description="batch norm: fixed statistics at inference, so a whole-body pass and a 96^3 patch see the "
                             "same normalisation (instance norm would re-normalise over whatever field of view it gets)")
    sites_from: Literal["skip", "final"] = Field(
        "skip", description="skip: the site head reads the half-resolution skip level of the U-Net (encoder and "
                            "decoder features); final: the pooled final feature map (models before 1.2)")
    log_channel: bool = Field(
        False, description="also feed log(image + 0.03) as a second input channel: a lesion is defined by its ratio "
                           "to its own marrow, which the log turns into a difference that convolutions see as they "
                           "see an edge, whatever the marrow's own brightness (models before 1.3: image only)")
    intensity_reference: Literal["p99", "p75"] = Field(
        "p99", description="what 1.0 of the normalised input is (models.preprocessing.normalise): p99, the 99th "
                           "percentile of body voxels; p75, the 75th percentile scaled to match p99 on whole-body "
                           "views, which does not brighten knee and foot views (models before 1.3: p99)")
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    patch: tuple[int, int, int] = (96, 96, 96)

    @property
    def in_channels(self) -> int:
        return 2 if self.log_channel else 1

    @model_validator(mode="after")
    def _levels_fit(self) -> "NetworkConfig":
        if self.arch == "unet" and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"network.strides needs one entry fewer than network.channels (got {len(self.strides)} "
                             f"strides for {len(self.channels)} channels)")
        if self.arch == "basicunet" and len(self.channels) != 6:
            raise ValueError("basicunet needs 6 channels, e.g. [16,16,32,64,128,16]")
        if min(self.channels, default=0) < 1 or min(self.strides, default=0) < 1:
            raise ValueError("network.channels and network.strides must be positive")
        if min(self.spacing_mm) <= 0 or min(self.patch) < 1:
            raise ValueError("network.spacing_mm and network.patch must be positive")
        return self


class WbmriNet(nn.Module):
    """U-Net body, full-resolution edema/bone logits, half-resolution site logits."""

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        if cfg.arch == "unet":
            from monai.networks.nets import UNet
            self.body = UNet(3, cfg.in_channels, cfg.features, cfg.channels, cfg.strides, num_res_units=cfg.res_units,
                             dropout=cfg.dropout, norm=cfg.norm)
        else:
            from monai.networks.nets import BasicUNet
            self.body = BasicUNet(3, cfg.in_channels, cfg.features, features=cfg.channels, dropout=cfg.dropout,
                                  norm=cfg.norm if cfg.norm == "batch" else ("instance", {"affine": True}))
        self.log_channel = cfg.log_channel
        self.size_divisor = size_divisor(cfg)  # spatial input sizes must be multiples of this
        self.act = nn.PReLU(cfg.features)
        self.voxel = nn.Conv3d(cfg.features, len(VOXEL_CHANNELS), 1)
        self.sites_from = cfg.sites_from
        self._half: torch.Tensor | None = None
        if cfg.sites_from == "skip":
            level, site_in = _half_resolution_level(self.body, cfg)
            level.register_forward_hook(self._keep_half)
            width = 64
        else:
            site_in, width = cfg.features, 32
        self.sites = nn.Sequential(nn.Conv3d(site_in, width, 1), nn.PReLU(width), nn.Conv3d(width, n_sites() + 1, 1))

    def _keep_half(self, module: nn.Module, args, output: torch.Tensor) -> None:
        self._half = output

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the normalised image, (N, 1, D, H, W); the log channel (if any) is made here."""
        if self.log_channel:
            x = with_log_channel(x)
        feat = self.act(self.body(x))
        if self.sites_from == "skip":
            half, self._half = self._half, None
        else:
            half = nn.functional.avg_pool3d(feat, 2, ceil_mode=True)
        return self.voxel(feat), self.sites(half)


def fixed_modules(net: nn.Module, train_only) -> list[nn.Module]:
    """Hold every part of ``net`` not named in ``train_only`` (:data:`NETWORK_PARTS`) fixed: its parameters stop
    asking for gradients. Returns those modules, which training keeps in eval mode so that their batch-norm
    statistics stay too; none when ``train_only`` is empty (the whole network trains)."""
    if not train_only:
        return []
    keep = {path for part in train_only for path in NETWORK_PARTS[part]}
    named = dict(net.named_modules())
    if missing := sorted(keep - set(named)):
        raise ValueError(f"optim.train_only {list(train_only)}: this network has no {missing} (top needs arch unet)")
    fixed: list[nn.Module] = []

    def hold(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if path in keep:
                continue
            if any(k.startswith(path + ".") for k in keep):
                hold(child, path + ".")  # a kept part lies inside: hold its siblings, not the whole
            else:
                fixed.append(child)

    hold(net, "")
    for m in fixed:
        m.requires_grad_(False)
    return fixed


def with_log_channel(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, ...) -> (N, 2, ...): the image and log(image + LOG_EPS), in the input's memory format."""
    return torch.cat([x, torch.log(x.clamp_min(0) + LOG_EPS)], 1).contiguous(memory_format=memory_format_of(x))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for a 5-D tensor stored that way, else the contiguous format: what derived tensors keep."""
    return torch.channels_last_3d if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) \
        else torch.contiguous_format


def widen_input_weights(theirs: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Weights of a bundle that fit ``own``: same-shape tensors as they are, and convolution weights that only
    lack input channels (a network that gained the log channel) padded with zeros, so the widened network
    computes exactly what the old one did until training teaches it to use the new channel. Returns the
    fitting tensors and the names of the widened ones."""
    fit, widened = {}, []
    for k, v in theirs.items():
        if k not in own:
            continue
        w = own[k]
        if w.shape == v.shape:
            fit[k] = v
        elif v.dim() == 5 and w.dim() == 5 and w.shape[0] == v.shape[0] and w.shape[2:] == v.shape[2:] \
                and v.shape[1] < w.shape[1]:
            pad = torch.zeros((w.shape[0], w.shape[1] - v.shape[1], *w.shape[2:]), dtype=v.dtype)
            fit[k] = torch.cat([v, pad], 1)
            widened.append(k)
    return fit, widened


def _half_resolution_level(body: nn.Module, cfg: NetworkConfig) -> tuple[nn.Module, int]:
    """The body's module whose output is the half-resolution skip level, and its channel count.

    MONAI ``UNet``: the top ``SkipConnection`` concatenates the first (stride-2) encoder block with the decoder
    below it: ``2 * channels[0]`` channels at half resolution. ``BasicUNet``: ``upcat_2``, ``channels[1]``.
    """
    if cfg.arch == "unet":
        if cfg.strides[0] != 2:
            raise ValueError("sites_from 'skip' needs network.strides[0] == 2 (the site head works at half resolution)")
        return body.model[1], 2 * cfg.channels[0]
    return body.upcat_2, cfg.channels[1]



TTA_MODES = ("none", "flip_lr", "flip_lr_anatomy", "flip_lr_anatomy_filled", "flip_lr_anatomy_shift4",
             "flip_lr_anatomy_shift8")
# Input shifts (voxels along x, y, z) of the edema shift ensemble: phases modulo the U-Net's total stride (16),
# spread so that the first 4 and all 8 cover every axis's phases evenly (x and y in steps of 2-4, z alternating parity).
SHIFTS = ((0, 0, 0), (6, 10, 7), (12, 4, 14), (2, 14, 5), (8, 8, 12), (14, 2, 3), (4, 12, 10), (10, 6, 1))
FILL_EDEMA_P = 0.2     # edema probability above which ``*_filled`` paints a voxel over before the anatomy passes
FILL_WINDOW = 7        # voxels: the neighbourhood whose normal marrow fills it (21 mm at 3 mm spacing)


def forward_tta(net: nn.Module, x: torch.Tensor, tta: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """The network's (voxel, site) logits for ``x`` (N, C, X, Y, Z on RAS axes), optionally averaged with those of
    its left-right mirror image: the mirrored outputs are flipped back and their left and right site channels
    swapped, so both passes vote for the same anatomy. ``flip_lr`` averages every output; ``flip_lr_anatomy``
    the anatomy only (sites, bone, physis), so the edema channel, and the lesion rules chosen for it, stay the
    plain pass's. Either costs a second pass. ``flip_lr_anatomy_filled`` reads the anatomy from the image with
    the plain pass's edema painted over by the surrounding normal marrow (:func:`fill_edema`), so a bright lesion
    cannot pull its bone's site label to a neighbouring bone; a third pass where there is edema to fill."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, not {tta!r}")
    voxel, sites = net(x)
    if tta == "none":
        return voxel, sites
    edema = voxel[:, EDEMA].float()
    if tta == "flip_lr_anatomy_filled":
        filled = fill_edema(x, torch.sigmoid(edema[:, None]), torch.sigmoid(voxel[:, BONE:BONE + 1].float()))
        if filled is not x:
            x = filled
            voxel, sites = net(x)
    m_voxel, m_sites = net(torch.flip(x, (2,)).contiguous(memory_format=memory_format_of(x)))
    swap = torch.as_tensor(mirror_ids(), device=x.device)
    sites = (sites.float() + _select_channels(torch.flip(m_sites.float(), (2,)), swap)) / 2
    mean = (voxel.float() + torch.flip(m_voxel.float(), (2,))) / 2
    if tta != "flip_lr":
        mean[:, EDEMA] = edema
    if "_shift" in tta:
        mean[:, EDEMA] = shifted_edema(net, x, edema, int(tta.rsplit("_shift", 1)[1]))
    return mean, sites


def _select_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(1, index)`` for a 5-D tensor, gathered along the last axis of its channels-last view: the
    same values, but on a channels_last_3d volume of a whole body's half-resolution site logits (67 x 64 x 48 x 240)
    0.19 s against ``index_select``'s 0.63 s on 2 CPU cores."""
    return x.permute(0, 2, 3, 4, 1)[..., index].permute(0, 4, 1, 2, 3)


def shifted_edema(net: nn.Module, x: torch.Tensor, edema: torch.Tensor, n: int) -> torch.Tensor:
    """Edema logits of the mean probability over the first ``n`` input shifts of :data:`SHIFTS` (``edema``: the
    unshifted pass's logits). Each shift pads the input at its start (and its end, to keep sizes multiples of the
    network's ``size_divisor``), so every lesion is seen at several phases of the strided convolutions."""
    prob = torch.sigmoid(edema.float())
    X, Y, Z = x.shape[2:]
    for shift in SHIFTS[1:n]:
        pad = []
        for s, size in zip(reversed(shift), (Z, Y, X)):  # F.pad takes the last axis first
            pad += [s, -(size + s) % net.size_divisor]
        v, _ = net(nn.functional.pad(x, pad).contiguous(memory_format=memory_format_of(x)))
        sx, sy, sz = shift
        prob = prob + torch.sigmoid(v[:, EDEMA, sx:sx + X, sy:sy + Y, sz:sz + Z].float())
    return torch.logit((prob / n).clamp(1e-6, 1 - 1e-6))


def fill_edema(x: torch.Tensor, edema_p: torch.Tensor, bone_p: torch.Tensor, p: float = FILL_EDEMA_P,
               window: int = FILL_WINDOW, rounds: int = 4) -> torch.Tensor:
    """``x`` (N, 1, ...) with every voxel of edema probability > ``p`` (and its 26 neighbours) replaced by the mean
    of the unfilled bone voxels within ``window`` voxels, or of any unfilled voxels where no bone is near; larger
    holes fill from their rim inwards over ``rounds``, the rest with the median of bone. Returns ``x`` itself when
    there is nothing to fill."""
    hole = nn.functional.max_pool3d((edema_p > p).float(), 3, 1, 1) > 0
    if not bool(hole.any()):
        return x
    img = x.float()
    known = ~hole
    marrow = (bone_p > 0.5) & known
    fallback = img[marrow].median() if bool(marrow.any()) else img[known].median()
    out = img.clone()
    for _ in range(rounds):
        for weights in (marrow, known):
            mean, seen = _box_mean(out, weights.float(), window)
            take = hole & seen
            out = torch.where(take, mean, out)
            known, hole = known | take, hole & ~take
            marrow = marrow | take
        if not bool(hole.any()):
            break
    return torch.where(hole, fallback, out).to(x.dtype).contiguous(memory_format=memory_format_of(x))


def _box_mean(img: torch.Tensor, weights: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of ``img`` over a ``window``-wide box around each voxel (separable), and where it exists."""
    num, den = img * weights, weights
    for axis in range(3):
        kernel = [1, 1, 1]
        kernel[axis] = window
        pad = [0, 0, 0]
        pad[axis] = window // 2
        num = nn.functional.avg_pool3d(num, kernel, 1, pad)
        den = nn.functional.avg_pool3d(den, kernel, 1, pad)
    return num / den.clamp_min(1e-6), den > 1e-6


def upsample_site_ids(site_logits: torch.Tensor, bone_only: bool = True) -> torch.Tensor:
    """Half-resolution site logits (1, C, d, h, w) -> full-resolution site ids (2d, 2h, 2w), uint8.

    The argmax is taken at half resolution and the ids are repeated (nearest), so no full-resolution 67-channel
    float volume is ever made (that alone would be 1.3 GB for a child's whole body). ``bone_only`` ignores the
    background class: where a voxel is bone is decided by the full-resolution bone channel.
    """
    logits = site_logits[0, 1:] if bone_only else site_logits[0]
    ids = logits.argmax(0).to(torch.uint8) + (1 if bone_only else 0)
    return ids.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)


def build_network(cfg: NetworkConfig) -> WbmriNet:
    return WbmriNet(cfg)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for CUDA without one is a clear error."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 or AMX); elsewhere bf16 would be emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on CPUs with native bf16, fp16/bf16 on CUDA, otherwise a no-op context."""
    if not enabled:
        return nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if cpu_supports_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def size_divisor(cfg: NetworkConfig) -> int:
    """Spatial input sizes must be multiples of this (the product of the U-Net strides)."""
    out = 1
    for s in cfg.strides:
        out *= s
    return out
