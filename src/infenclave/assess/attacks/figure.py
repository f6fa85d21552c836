"""A picture of what the host could see: each photo beside its reconstruction per cut point."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from infenclave.assess.attacks.runner import AttackResults
from infenclave.errors import AssessmentError


def inversion_grid(
    results: AttackResults,
    attack: str,
    *,
    cuts: Sequence[str] | None = None,
    images: Sequence[str] | None = None,
    label: bool = True,
) -> np.ndarray:
    """(rows x (1 + cuts)) grid as one uint8 RGB array: original, then one column per cut.

    Each reconstruction is captioned with its cut, SSIM and whether the judge recognised it
    (red when the verdict calls it a leak).
    """
    from PIL import Image, ImageDraw

    done = [c for c in results.cuts if c.attack == attack]
    if cuts is not None:
        done = [c for c in done if c.cut in cuts]
    if not done:
        raise AssessmentError(f"no {attack} results to draw")
    names = list(images) if images is not None else list(results.originals)
    h, w = next(iter(results.originals.values())).shape[:2]
    caption = 28 if label else 0
    grid = Image.new("RGB", ((1 + len(done)) * w, len(names) * (h + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for row, name in enumerate(names):
        y = row * (h + caption)
        grid.paste(Image.fromarray(results.originals[name]), (0, y))
        if label:
            draw.text((4, y + h + 2), f"{name} (original)", fill="black")
        for col, cut in enumerate(done, 1):
            rec = next((r for r in cut.images if r.image == name), None)
            if rec is None:  # the cut's attack stopped once it could not be safe
                if label:
                    draw.text((col * w + 4, y + h // 2), "not attacked:\ncut already unsafe", fill="dimgray")
                continue
            grid.paste(Image.fromarray(rec.reconstruction), (col * w, y))
            if label:
                mark = "re-identified" if rec.reidentified else "recognised" if rec.recognised else "not recovered"
                draw.text((col * w + 4, y + h + 2), f"{cut.cut} {list(cut.shape)}", fill="black")
                # red when the verdict says leaked; never green: a reconstruction the judge
                # misses can still be plain to a person (look at the picture)
                draw.text(
                    (col * w + 4, y + h + 14),
                    f"SSIM {rec.ssim:.2f}, {mark}",
                    fill="firebrick" if rec.unsafe else "dimgray",
                )
    return np.asarray(grid)


def save_inversion_grid(results: AttackResults, attack: str, path: Path, **kwargs: object) -> Path:
    """Write `inversion_grid` as a PNG."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(inversion_grid(results, attack, **kwargs)).save(path, optimize=True)  # type: ignore[arg-type]
    return path
