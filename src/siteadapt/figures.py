"""Figures the steps write (evaluation overlays, classification examples, translation grids, report figures).

Every image figure is laid out in inches from its panel grid: a panel is sized to its image's aspect ratio (so an
``imshow`` fills it exactly), panels sit a few hundredths of an inch apart, and the figure is exactly as large as
the grid plus one line per text row (header, panel titles, colour key), so no band of the page is left empty. Text
is measured before the layout is made (:func:`text_width`): a header or a colour key that does not fit the figure's
width is wrapped onto another line instead of running over the panels. Line plots (ROC, training curves) use
matplotlib's constrained layout with small pads.

The drawing functions return the :class:`~matplotlib.figure.Figure` (tests read its texts); :func:`save_figure`
writes a PNG atomically and closes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .io.atomic import atomic_path

DPI = 100
PAD = 0.04  # inches: outer margin and the gap between panels
HEADER_PT = 9
TITLE_PT = 8
KEY_PT = 8
SEP = " · "


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def text_width(text: str, pt: float) -> float:
    """Width in inches of one line of ``text`` at ``pt`` points in the default font."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    w, _, _ = text_to_path.get_text_width_height_descent(text, FontProperties(size=pt), ismath=False)
    return w / 72.0


def line_in(pt: float, leading: float = 1.3) -> float:
    """Height in inches of one text line at ``pt`` points (``leading`` times the font size)."""
    return pt * leading / 72.0


def wrap(parts: Sequence[str], pt: float, width: float, sep: str = SEP) -> list[str]:
    """``parts`` joined by ``sep`` into as few lines as fit ``width`` inches (a part wider than that gets a line)."""
    lines: list[str] = []
    for p in parts:
        if lines and text_width(lines[-1] + sep + p, pt) <= width:
            lines[-1] += sep + p
        else:
            lines.append(p)
    return lines


def label_colors(n_labels: int) -> list[tuple]:
    """RGBA colour of each label value 0 .. n_labels - 1 (0, the background, is never drawn)."""
    plt = _plt()
    tab = plt.get_cmap("tab10")
    return [(0, 0, 0, 0)] + [tab((k - 1) % 10) for k in range(1, max(n_labels, 2))]


def panel_inches(shape: tuple[int, int], max_w: float, max_h: float) -> tuple[float, float]:
    """(width, height) in inches of a panel showing a ``shape`` (rows, columns) image at its own aspect ratio,
    as large as fits ``max_w`` x ``max_h``."""
    aspect = shape[1] / max(shape[0], 1)
    w = min(max_w, max_h * aspect)
    return w, w / aspect


def image_grid(nrows: int, ncols: int, panel_w: float, panel_h: float, *, header_in: float = 0.0,
               title_in: float = 0.0, left_in: float = 0.0, footer_in: float = 0.0, pad: float = PAD):
    """A figure exactly the size of an ``nrows`` x ``ncols`` grid of ``panel_w`` x ``panel_h`` inch panels, with
    ``header_in`` inches of header on top, ``title_in`` above each row (panel titles), ``left_in`` on the left
    (row labels) and ``footer_in`` below. Returns (figure, 2D array of axes, their axis lines off)."""
    plt = _plt()
    width = 2 * pad + left_in + ncols * panel_w + (ncols - 1) * pad
    row_h = title_in + panel_h
    height = 2 * pad + header_in + nrows * row_h + (nrows - 1) * pad + footer_in
    fig = plt.figure(figsize=(width, height), dpi=DPI, facecolor="white")
    axes = np.empty((nrows, ncols), dtype=object)
    for r in range(nrows):
        top = pad + header_in + r * (row_h + pad) + title_in  # inches from the figure's top to the panel's top
        for c in range(ncols):
            x0 = pad + left_in + c * (panel_w + pad)
            ax = fig.add_axes((x0 / width, 1 - (top + panel_h) / height, panel_w / width, panel_h / height))
            ax.set_axis_off()
            axes[r, c] = ax
    return fig, axes


def _header(fig, lines: list[str], pt: float = HEADER_PT, pad: float = PAD, top_in: float = 0.0) -> float:
    """Left-aligned header lines from ``top_in`` inches below the top margin; returns the inches they take."""
    w, h = fig.get_size_inches()
    for i, line in enumerate(lines):
        fig.text(pad / w, 1 - (pad + top_in + i * line_in(pt)) / h, line, ha="left", va="top", fontsize=pt)
    return len(lines) * line_in(pt)


# colour-key geometry (in units of the key's font size), as handed to ``Figure.legend``
_KEY = dict(handlelength=0.9, handleheight=0.9, handletextpad=0.4, columnspacing=1.0)


def _entry_in(name: str, pt: float) -> float:
    return (_KEY["handlelength"] + _KEY["handletextpad"]) * pt / 72.0 + text_width(name, pt)


def _key_width(names: list[str], pt: float) -> float:
    return sum(_entry_in(n, pt) for n in names) + (len(names) - 1) * _KEY["columnspacing"] * pt / 72.0


def _key_columns(names: list[str], pt: float, width: float) -> int:
    """How many key entries go on one line so that every line fits ``width`` inches (entries fill a table row by
    row, so each column is as wide as its widest entry)."""
    for ncol in range(len(names), 1, -1):
        cols = [max(_entry_in(n, pt) for n in names[c::ncol]) for c in range(ncol)]
        if sum(cols) + (ncol - 1) * _KEY["columnspacing"] * pt / 72.0 <= width:
            return ncol
    return 1


def _draw_key(fig, names: list[str], colors: list, ncol: int, *, top_in: float, right: bool, pt: float = KEY_PT,
              pad: float = PAD) -> None:
    """A frameless colour key (square swatches and names, ``ncol`` to a line) whose top is ``top_in`` inches below
    the top margin, right-aligned (``right``) or left-aligned."""
    from matplotlib.patches import Patch

    w, h = fig.get_size_inches()
    handles = [Patch(facecolor=c[:3], edgecolor="none", alpha=0.8, label=n) for n, c in zip(names, colors)]
    y = 1 - (pad + top_in) / h
    # entries fill the table row by row (the legend fills columns first: reorder)
    nrows = -(-len(handles) // ncol)
    order = [r * ncol + c for c in range(ncol) for r in range(nrows) if r * ncol + c < len(handles)]
    fig.legend([handles[i] for i in order], [names[i] for i in order], ncol=ncol, frameon=False, fontsize=pt,
               loc="upper right" if right else "upper left", bbox_to_anchor=((w - pad) / w if right else pad / w, y),
               borderpad=0, borderaxespad=0, labelspacing=0.3, **_KEY)


def save_figure(fig, path: Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically) and close it."""
    plt = _plt()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", facecolor=fig.get_facecolor())
    finally:
        plt.close(fig)
    return path


def close_figure(fig) -> None:
    """Close ``fig`` without writing it."""
    _plt().close(fig)


def overlay_title(site: str, method: str, subject: str, dice: float | None = None) -> str:
    """The short title of a segmentation overlay: site, method, subject and the subject's mean Dice."""
    tail = "no reference" if dice is None else f"Dice {dice:.3f}"
    return SEP.join([site, method, subject, tail])


def examples_title(site: str, method: str, split: str, auc: float | None = None, threshold: float | None = None,
                   threshold_split: str | None = None) -> str:
    """The short title of a classification examples figure: site, method, split, AUC (%) and the threshold."""
    if auc is None:
        return SEP.join([site, method, split, "no labels"])
    return SEP.join([site, method, split, f"AUC {100 * auc:.1f}", f"threshold {threshold:.3f} ({threshold_split})"])


def overlay_figure(im: np.ndarray, ref: np.ndarray, pred: np.ndarray, *, title: str, n_labels: int,
                   structures: dict[str, int] | None = None, ref_title: str = "reference", pixel_aspect: float = 1.0):
    """Image | reference | prediction panels of one 2D slice (already the way up it is drawn: see
    ``steps.evaluate.display_slice``), the title on top and a colour key of ``structures`` (name -> label value)
    right of it (below it where both do not fit on one line). ``pixel_aspect``: a pixel's height over its width
    (anisotropic voxels); panels take the slice's physical proportions."""
    plt = _plt()
    lo, hi = np.percentile(im, [1, 99]) if im.size else (0.0, 1.0)
    colors = label_colors(n_labels)
    pw, ph = panel_inches((im.shape[0] * pixel_aspect, im.shape[1]), max_w=3.0, max_h=2.6)
    width = 3 * pw + 4 * PAD
    names = list(structures or {})
    title_lines = wrap(title.split(SEP), HEADER_PT, width - 2 * PAD)
    key_rows, key_right, ncol = 0, False, max(len(names), 1)
    if names:
        free = width - 2 * PAD - text_width(title_lines[-1], HEADER_PT) - 0.25
        if len(title_lines) == 1 and _key_width(names, KEY_PT) <= free:
            key_right = True  # on the title's line, right-aligned
        else:
            ncol = _key_columns(names, KEY_PT, width - 2 * PAD)
            key_rows = -(-len(names) // ncol)
    header = len(title_lines) * line_in(HEADER_PT) + key_rows * line_in(KEY_PT)
    fig, axes = image_grid(1, 3, pw, ph, header_in=header, title_in=line_in(TITLE_PT, 1.15) + 2 / 72)
    _header(fig, title_lines)
    if names:
        values = [structures[n] for n in names]
        _draw_key(fig, names, [colors[v] if 0 < v < len(colors) else (0.5, 0.5, 0.5, 1) for v in values], ncol,
                  top_in=0.0 if key_right else len(title_lines) * line_in(HEADER_PT), right=key_right)
    cmap = _label_cmap(colors)
    for ax, lab, name in zip(axes[0], (None, ref, pred), ("image", ref_title, "prediction")):
        ax.imshow(im, cmap="gray", vmin=lo, vmax=hi, aspect="auto")
        if lab is not None:
            ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=-0.5, vmax=len(colors) - 0.5, alpha=0.5,
                      interpolation="nearest", aspect="auto")
        ax.set_title(name, fontsize=TITLE_PT, pad=2)
    return fig


def _label_cmap(colors: list):
    from matplotlib.colors import ListedColormap

    return ListedColormap([c[:3] for c in colors])


def examples_figure(panels: list[tuple[np.ndarray | None, str, str]], title: str, *, ncols: int = 4):
    """Classification examples: one panel per ``(image or None, caption, caption colour)`` (images already the
    way up they are drawn, intensities in [-1, 1]), ``ncols`` to a row, the ``title`` on top."""
    shape = next((p[0].shape for p in panels if p[0] is not None), (1, 1))
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    pw, ph = panel_inches(shape, max_w=2.0, max_h=2.0)
    width = ncols * pw + (ncols + 1) * PAD
    # a caption that does not fit its panel on one line takes two (every row then gets two lines)
    cap_lines = max((len(wrap(c.split(SEP), TITLE_PT - 1, pw - 0.1)) for _, c, _ in panels), default=1)
    cap_lines = min(cap_lines, 2)
    title_lines = wrap(title.split(SEP), HEADER_PT, width - 2 * PAD)
    fig, axes = image_grid(nrows, ncols, pw, ph, header_in=len(title_lines) * line_in(HEADER_PT),
                           title_in=cap_lines * line_in(TITLE_PT - 1, 1.15) + 2 / 72)
    _header(fig, title_lines)
    for ax, (img, caption, color) in zip(axes.ravel(), panels):
        if img is not None:
            ax.imshow(img, cmap="gray", vmin=-1, vmax=1, aspect="auto")
        lines = wrap(caption.split(SEP), TITLE_PT - 1, pw - 0.1)
        text = "\n".join(lines[:1] + [SEP.join(lines[1:])] if len(lines) > 1 else lines)
        ax.set_title(text, fontsize=TITLE_PT - 1, color=color, pad=2, linespacing=1.1)
    return fig


def translations_figure(rows: list[tuple[str, list[np.ndarray]]]):
    """A grid of 2D images (already the way up they are drawn, intensities in [-1, 1]): one row per
    ``(name, images)``, the name written up the row's left edge."""
    ncols = max(len(imgs) for _, imgs in rows)
    pw, ph = panel_inches(rows[0][1][0].shape, max_w=1.8, max_h=1.8)
    label_pt = TITLE_PT - 1
    # a row name longer than its panel's height is wrapped at spaces
    names = ["\n".join(wrap(n.split(" "), label_pt, ph, sep=" ")) for n, _ in rows]
    left = max(n.count("\n") + 1 for n in names) * line_in(label_pt)
    fig, axes = image_grid(len(rows), ncols, pw, ph, left_in=left)
    w, _ = fig.get_size_inches()
    for r, ((_, imgs), name) in enumerate(zip(rows, names)):
        for c, a in enumerate(imgs):
            axes[r, c].imshow(a, cmap="gray", vmin=-1, vmax=1, aspect="auto")
        ax = axes[r, 0]
        ax.text(-(PAD / 2) / pw, 0.5, name, transform=ax.transAxes, rotation=90, ha="right", va="center",
                fontsize=label_pt, linespacing=1.0)
    return fig


def plot_figure(width: float, height: float):
    """(figure, axes) of a line plot in constrained layout with small pads."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(width, height), dpi=DPI, layout="constrained", facecolor="white")
    fig.get_layout_engine().set(w_pad=PAD, h_pad=PAD, wspace=0, hspace=0)
    return fig, ax


def stack_pngs(paths: Sequence[Path], out: Path, gap_px: int = 4) -> Path:
    """The PNGs at ``paths`` one under the other (each cropped to what is not white), pixel for pixel (no
    resampling), ``gap_px`` white pixels apart, written to ``out``."""
    plt = _plt()
    parts = []
    for p in paths:
        a = plt.imread(p)
        if a.dtype != np.float32 and a.dtype != np.float64:
            a = a.astype(np.float32) / 255.0
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        a = a[..., :3]
        ink = (a < 0.99).any(-1)
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        if rows.size:
            a = a[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
        parts.append(a)
    width = max(a.shape[1] for a in parts) + 2 * gap_px
    canvas = []
    for a in parts:
        row = np.ones((a.shape[0], width, 3), np.float32)
        x0 = (width - a.shape[1]) // 2
        row[:, x0: x0 + a.shape[1]] = a
        canvas += [np.ones((gap_px, width, 3), np.float32), row]
    canvas.append(np.ones((gap_px, width, 3), np.float32))
    with atomic_path(out) as tmp:
        plt.imsave(tmp, np.clip(np.concatenate(canvas), 0, 1), format="png")
    return out
