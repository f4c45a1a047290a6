"""Shared matplotlib helpers: one figure style, atomic PNG writes, image grids.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``),
never ``pyplot``: no global state, no GUI backend, safe in worker threads.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, ParamSpec, Sequence, TypeVar

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from vq2pc.circuit.finetune import CAP_MARK
from vq2pc.core.files import atomic_write

__all__ = [
    "DPI",
    "FAMILY_STYLE",
    "styled",
    "new_figure",
    "save_figure",
    "image_grid",
    "to_rgb",
    "tile",
    "tile_rgb",
    "as_images",
    "hidden_pixels",
    "clean_axes",
    "family_style",
    "MASK_COLOR",
]

DPI = 120
MASK_COLOR = (0.85, 0.1, 0.1)  # hidden (unobserved) pixels are drawn in red, as in the paper's Fig. 3

_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}

# One look per model family across every figure: (colour, marker, trained?).
FAMILY_STYLE: dict[str, tuple[str, str, bool]] = {
    "ExM": ("tab:blue", "s", False),
    "DMRS": ("tab:purple", "s", False),
    "DMBS": ("tab:green", "D", False),
    "DMGS": ("tab:red", "P", False),
    "TopK": ("tab:orange", "^", False),
    "DMData": ("tab:olive", "v", False),
    "DMRS+EM": ("tab:pink", "s", True),
    "DMRS+FT": ("indigo", "s", True),
    "DMBS+FT": ("darkgreen", "D", True),
    "DMGS+FT": ("darkred", "P", True),
    "TopK+FT": ("darkorange", "^", True),
    "DMData+FT": ("darkolivegreen", "v", True),
    "CM": ("tab:brown", "o", False),
    "EiNet": ("tab:gray", "o", True),
    "QuadGraph": ("tab:cyan", "h", True),
    "QuadTree": ("tab:blue", "h", True),
    "HCLT": ("black", "X", True),
    "PIC": ("teal", "h", True),
}
_FALLBACK_COLORS = ["tab:red", "tab:pink", "tab:cyan", "black"]


def family_style(family: str) -> tuple[str, str, bool]:
    """``(colour, marker, trained)`` for a family; a capped one ("DMRS+FT σ<0.125") takes its base's colour with
    a star; unknown families get a stable fallback."""
    if family in FAMILY_STYLE:
        return FAMILY_STYLE[family]
    base, _, cap = family.partition(CAP_MARK)
    if cap and base in FAMILY_STYLE:
        return FAMILY_STYLE[base][0], "*", FAMILY_STYLE[base][2]
    color = _FALLBACK_COLORS[sum(map(ord, family)) % len(_FALLBACK_COLORS)]
    return color, "P", False


_P = ParamSpec("_P")
_R = TypeVar("_R")


def styled(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator: run a plotting function under the shared rc style (axes read it when created)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)

    return wrapper


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width × height`` inches with constrained layout (call inside :func:`styled`)."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig: Figure, out_png: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically (temp file + rename); returns the path."""
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise ValueError(f"figure path must end in .png: {out_png}")
    return atomic_write(out_png, lambda p: fig.savefig(p, format="png", dpi=DPI))


def to_rgb(img: Tensor, hidden: Tensor | None = None) -> np.ndarray:
    """One image ``[C,H,W]`` in ``[0,1]`` -> RGB array ``[H,W,3]``; ``hidden [H,W]`` pixels painted red."""
    img = img.detach().float().clamp(0, 1).cpu()
    rgb = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
    rgb = rgb.permute(1, 2, 0).numpy().copy()
    if hidden is not None:
        rgb[hidden.detach().cpu().numpy().astype(bool)] = MASK_COLOR
    return rgb


def tile_rgb(panels: Sequence[np.ndarray], ncols: int, pad: int = 1) -> np.ndarray:
    """Equal-sized RGB panels ``[H,W,3]`` -> one mosaic with ``ncols`` columns and white gaps."""
    h, w, _ = panels[0].shape
    nrows = -(-len(panels) // ncols)
    out = np.ones((nrows * (h + pad) - pad, ncols * (w + pad) - pad, 3), dtype=np.float32)
    for i, panel in enumerate(panels):  # a handful of thumbnails for a picture, not a hot path
        r, c = divmod(i, ncols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = panel
    return out


def tile(images: Tensor, ncols: int, pad: int = 1) -> np.ndarray:
    """Images ``[n,C,H,W]`` in ``[0,1]`` -> one RGB mosaic with ``ncols`` columns."""
    return tile_rgb([to_rgb(img) for img in images], ncols, pad)


def image_grid(ax, images: Tensor, ncols: int, title: str | None = None) -> None:
    """Draw ``images [n,C,H,W]`` (``[0,1]``) as a mosaic with ``ncols`` columns on ``ax``."""
    ax.imshow(tile(images, ncols), interpolation="nearest")
    clean_axes(ax)
    if title:
        ax.set_title(title)


def as_images(x: Tensor, image_shape: tuple[int, int, int]) -> Tensor:
    """``[n,S]`` or ``[n,C,H,W]`` -> ``[n,C,H,W]``, checking ``S == C*H*W``."""
    c, h, w = image_shape
    if x.dim() == 4 and tuple(x.shape[1:]) == (c, h, w):
        return x
    if x.dim() == 2 and x.shape[1] == c * h * w:
        return x.reshape(-1, c, h, w)
    raise ValueError(f"images of shape {tuple(x.shape)} do not match image_shape {image_shape}")


def hidden_pixels(mask: Tensor, image_shape: tuple[int, int, int]) -> Tensor:
    """Observed-mask ``[S]`` -> hidden map ``[H,W]`` (a pixel is hidden if any of its channels is)."""
    c, h, w = image_shape
    return (~mask.bool()).reshape(c, h, w).any(0)


def clean_axes(ax) -> None:
    """Remove ticks, grid and frame (for image panels)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
