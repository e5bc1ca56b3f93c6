"""DALI pipeline graphs (imports nvidia.dali at the top; only xvol.data.dali imports this module,
after checking DALI is installed).

They mirror timm's transforms: train = RandomResizedCrop (ROI decode) -> [RandAugment | colour
jitter] -> flip + normalize to NCHW float -> random erasing with fill 0 (timm's
re_mode='const'); with ``pad`` > 0, CIFAR's pad-crop + flip instead (torchvision's RandomCrop
with padding). The normalization's mean/std are the data config's (ImageNet's by default). Eval
is timm's eval transform (``create_transform(is_training=False)``) pixel for pixel up to
rounding: see ``_eval_resize_crop``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import PIL
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import auto_augment as dali_auto_augment
from nvidia.dali.auto_aug import rand_augment as dali_rand_augment
from nvidia.dali.auto_aug import trivial_augment as dali_trivial_augment

from xvol.data.folder import IMAGENET_MEAN, IMAGENET_STD

READER = "Reader"
# keys: xvol.data.folder.INTERPOLATIONS, the names the config check accepts (a test: equal)
INTERPOLATIONS = {
    "bilinear": types.INTERP_LINEAR,
    "bicubic": types.INTERP_CUBIC,
    "nearest": types.INTERP_NN,
    "lanczos": types.INTERP_LANCZOS3,
}
# Both backends turn a photo upright by its EXIF Orientation tag (the PIL side:
# xvol.data.folder.open_rgb); said explicitly here so a change of DALI's default cannot split them.
_UPRIGHT = {"adjust_orientation": True}


def _augment(images, policy: str, size: int):
    """timm's auto_augment strings mapped to DALI's auto_aug (magnitude std is not supported)."""
    if policy.startswith("rand"):
        opts = dict(re.findall(r"-([a-z]+)([\d.]+)", policy))
        return dali_rand_augment.rand_augment(
            images, n=int(opts.get("n", 2)), m=int(float(opts.get("m", 9))), shape=(size, size)
        )
    if policy in ("original", "v0", "v0r", "originalr"):
        return dali_auto_augment.auto_augment_image_net(images, shape=(size, size))
    if policy.startswith("ta_wide") or policy.startswith("trivial"):
        return dali_trivial_augment.trivial_augment_wide(images, shape=(size, size))
    raise ValueError(
        f"data.auto_augment={policy!r} has no DALI equivalent (rand-*, original, ta_wide)"
    )


def _read(
    files: list[str],
    labels: list[int],
    file_root: str,
    shard_id: int,
    num_shards: int,
    pad_last_batch: bool = False,
):
    """The reader both graphs share: files in the given order (train: folder.epoch_order, as for
    torchvision; val: sorted), one fixed shard per rank."""
    return fn.readers.file(
        files=files,
        labels=labels,
        file_root=file_root,
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=False,
        stick_to_shard=True,
        pad_last_batch=pad_last_batch,
        name=READER,
    )


@pipeline_def
def train_pipeline(
    files: list[str],
    labels: list[int],
    file_root: str,
    shard_id: int,
    num_shards: int,
    decoder: str,
    size: int,
    interpolation: str,
    scale: Sequence[float],
    ratio: Sequence[float],
    hflip: float,
    color_jitter: float | None,
    auto_augment: str | None,
    reprob: float,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    pad: int = 0,
):
    jpegs, label = _read(files, labels, file_root, shard_id, num_shards)
    if pad:  # CIFAR-style: the whole image, zero padding of `pad` pixels, a random size crop
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **_UPRIGHT)
        images = fn.resize(
            images, resize_x=size, resize_y=size, interp_type=INTERPOLATIONS[interpolation]
        )
        offsets = fn.random.uniform(values=list(range(-pad, pad + 1)), shape=[2])
        anchor = fn.cast(offsets, dtype=types.INT32)
        images = fn.slice(
            images, start=anchor, shape=[size, size], axis_names="HW",
            out_of_bounds_policy="pad", fill_values=0,
        )  # fmt: skip
        auto_augment, color_jitter, reprob = None, None, 0.0
    else:
        images = fn.decoders.image_random_crop(
            jpegs,
            device=decoder,
            output_type=types.RGB,
            random_area=list(scale),
            random_aspect_ratio=list(ratio),
            num_attempts=10,
            **_UPRIGHT,
        )
        images = fn.resize(
            images, resize_x=size, resize_y=size, interp_type=INTERPOLATIONS[interpolation]
        )
    if auto_augment:
        images = _augment(images, auto_augment, size)
    elif color_jitter:  # timm also drops colour jitter when an auto-augment policy is set
        lo, hi = max(0.0, 1 - color_jitter), 1 + color_jitter
        images = fn.color_twist(
            images,
            brightness=fn.random.uniform(range=[lo, hi]),
            contrast=fn.random.uniform(range=[lo, hi]),
            saturation=fn.random.uniform(range=[lo, hi]),
        )
    images = fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255 * m for m in mean],
        std=[255 * v for v in std],
        mirror=fn.random.coin_flip(probability=hflip) if hflip > 0 else 0,
    )
    if reprob > 0:
        images = _random_erase(images, reprob)
    return images, label


def _random_erase(images, prob: float):
    """One rectangle of 2%..1/3 of the area, log-uniform aspect 0.3..3.3, filled with 0 (the mean
    after normalization), applied with probability ``prob``: timm's RandomErasing(mode='const')."""
    area = fn.random.uniform(range=[0.02, 1 / 3])
    aspect = dmath.exp(fn.random.uniform(range=[math.log(0.3), math.log(1 / 0.3)]))
    apply = fn.cast(fn.random.coin_flip(probability=prob), dtype=types.FLOAT)
    h = dmath.min(dmath.sqrt(area * aspect), 1.0)
    w = dmath.min(dmath.sqrt(area / aspect), 1.0)
    y = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - h)
    x = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - w)
    return fn.erase(
        images,
        anchor=fn.stack(y, x),
        shape=fn.stack(h * apply, w * apply),
        axis_names="HW",
        normalized_anchor=True,
        normalized_shape=True,
        fill_value=0.0,
    )


def _half_to_even(diff: Any) -> Any:
    """``round(diff / 2)`` as Python rounds (half to even) for whole ``diff`` >= 0: the centre
    crop offset torchvision's CenterCrop takes (``int(round((h - crop) / 2.0))``)."""
    half = dmath.floor(diff / 2.0)
    odd = diff - 2.0 * half  # 1 when diff is odd: a .5 to round
    return half + odd * (half - 2.0 * dmath.floor(half / 2.0))  # .5 goes up from an odd half


def _resample(images: Any, axis: int, extent: Any, start: Any, end: Any, size: int, interp):
    """One PIL pass: ``axis`` (0 rows, 1 columns) resampled from input ``[start, end)`` to
    ``size`` pixels, the other axis (``extent`` pixels) untouched; uint8 out, as PIL keeps it."""
    zero = extent * 0.0  # arguments are stacked per sample from data nodes

    def f32(*values: Any) -> Any:
        return fn.cast(fn.stack(*values), dtype=types.FLOAT)

    span = (zero + size, extent) if axis == 0 else (extent, zero + size)
    first, last = ((start, zero), (end, extent)) if axis == 0 else ((zero, start), (extent, end))
    return fn.resize(
        images,
        size=f32(*span),
        roi_start=f32(*first),
        roi_end=f32(*last),
        roi_relative=False,
        interp_type=interp,
    )


# Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks by
# more than twice as many pixels as the width; older Pillow always goes horizontal first. The
# order decides the 8-bit rounding in between, so the graph follows the Pillow installed.
PIL_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


def _eval_resize_crop(images: Any, size: int, crop_pct: float, interpolation: str) -> Any:
    """torchvision ``Resize(floor(size / crop_pct))`` + ``CenterCrop(size)`` on a PIL image.

    Each step follows the reference, since DALI's own ``resize_shorter`` + centred crop do not
    (they shifted the crop by up to a pixel, rescaled slightly and resampled in one float pass:
    0.05 mean absolute difference of the normalized tensors on real photos, 20x this graph's):

    - geometry: shorter side to ``S = floor(size / crop_pct)``, longer side ``int(S * long /
      short)`` (truncated, as torchvision computes it), crop offset ``round((new - size) / 2)``
      with Python's half-to-even rounding; computed per sample in float64 from the decoded shape;
    - resampling: PIL resizes in two passes, one per axis, each an antialiased filter, with an
      8-bit image in between (clipped and rounded); DALI's ``resize`` has the same filters, so
      it runs once per axis in PIL's order, with a uint8 result. Each pass reads the crop's
      region of the input (``roi_*``: output pixel i samples input ``(top + i + 0.5) * h /
      new_h``, exactly as when the whole image is resized and cropped after), so only the kept
      pixels are computed.

    Needs ``enable_conditionals`` (the pass order is chosen per sample).
    """
    shape = fn.cast(images.shape(), dtype=types.FLOAT64)  # H, W, C
    h, w = shape[0], shape[1]
    short_side = math.floor(size / crop_pct)
    long_side = dmath.floor(short_side * dmath.max(h, w) / dmath.min(h, w))
    new_h = (h <= w) * short_side + (h > w) * long_side
    new_w = (w <= h) * short_side + (w > h) * long_side
    top, left = _half_to_even(new_h - size), _half_to_even(new_w - size)
    rows = (top * h / new_h, (top + size) * h / new_h)
    cols = (left * w / new_w, (left + size) * w / new_w)
    interp = INTERPOLATIONS[interpolation]
    vertical_first = (new_h < h) & (h - new_h > 2 * (w - new_w))
    if PIL_VERTICAL_FIRST and vertical_first:
        images = _resample(images, 0, w, *rows, size, interp)
        images = _resample(images, 1, h * 0.0 + size, *cols, size, interp)
    else:
        images = _resample(images, 1, h, *cols, size, interp)
        images = _resample(images, 0, h * 0.0 + size, *rows, size, interp)
    return images


@pipeline_def(enable_conditionals=True)
def eval_pipeline(
    files: list[str],
    labels: list[int],
    file_root: str,
    shard_id: int,
    num_shards: int,
    decoder: str,
    size: int,
    crop_pct: float,
    interpolation: str,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
):
    # padded samples are trimmed by the iterator (LastBatchPolicy.PARTIAL)
    jpegs, label = _read(files, labels, file_root, shard_id, num_shards, pad_last_batch=True)
    images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **_UPRIGHT)
    images = _eval_resize_crop(images, size, crop_pct, interpolation)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mean=[255 * m for m in mean],
        std=[255 * v for v in std],
    )  # fmt: skip
    return images, label


@pipeline_def
def probe_pipeline(files: list[str], file_root: str, decoder: str):
    """Reads and decodes ``files`` one per batch: the loaders' way to find which file of a
    failed batch the decoder rejects (its own error often names none)."""
    jpegs, _ = fn.readers.file(
        files=files, labels=[0] * len(files), file_root=file_root, random_shuffle=False
    )
    return fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **_UPRIGHT)
