"""When is a reconstruction a leak? Three tests, any one suffices (fail closed).

0. **Re-identified**: its own source ranks first among a gallery of real photos by thumbnail
   structure or deep features (`reident.py`): the host can tell *which* photo it was.

1. **Recognised**: the independent judge puts the original's top-1 class in its top-5 for the
   reconstruction (`metrics.RECOGNITION_TOP_K`). Chance level is 5 in 1000 per photo, so over
   the 8 built-in photos a cut is called unsafe by luck alone with probability ~4%.
2. **Pixel-similar**: the reconstruction's SSIM reaches that of the photo's own *tiny image*
   (reduced to TINY_IMAGE_SIDE px and enlarged back). People recognise scenes and objects in
   32x32 colour images (Torralba, Fergus & Freeman, "80 million tiny images", PAMI 2008), so a
   reconstruction as close to the photo as its 32 px version shows what the photo shows.

Why not a fixed SSIM threshold such as 0.3: SSIM depends on the photo far more than on the
attack. Measured on the 8 built-in photos at 224 px (Lite0 preprocessing): a flat image of the
mean colour, which carries no information about the photo, scores SSIM 0.21-0.68 (mean 0.38),
so a fixed 0.3 would call "nothing recovered" a leak for most photos; unrelated photo pairs
score up to 0.45. The photo's own 32 px version scores 0.49-0.87 (mean 0.67) and the judge
recognises 4 of the 8 at that size (14 px: 1 of 8). Comparing with the photo's own reference
removes the dependence on content. SSIM still under-rates what a person sees in a sharp but
noisy reconstruction (white-box inversions at SSIM 0.1-0.3 can be plainly recognisable), which
is what test 1 and the pictures in the report are for.
"""

from __future__ import annotations

from typing import Protocol

TINY_IMAGE_SIDE = 32  # px: the "tiny image" a person still recognises (see the docstring)


class _ImageVerdictInput(Protocol):
    recognised: bool
    ssim: float
    ssim_reference: float


def attack_verdict(result: _ImageVerdictInput) -> bool:
    """True (recovered) when a reconstruction is re-identified, recognised or pixel-similar.

    `result` is an `ImageResult` (or anything with `recognised`, `ssim` and `ssim_reference`,
    the SSIM of the photo's own TINY_IMAGE_SIDE px version, and optionally `reidentified`:
    its source ranked first in the re-identification gallery, `reident.py`).
    """
    return bool(result.recognised or result.ssim >= result.ssim_reference or getattr(result, "reidentified", False))
