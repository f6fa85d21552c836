"""Draft-mode JPEG decoding: does it keep the top-5? Measured on real photos, plain predictor.

    .venv/bin/python bench/draft.py

The enclave (and `infenclave predict`, which shares `enclave/imaging.py`) decodes a large JPEG
at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling, Pillow `Image.draft`) as long as its short
side stays at least twice the model's resize target. This compares, per photo, the top-5 of
Lite0 with draft decoding against a full-size decode followed by the same resize and crop:
every JPEG of the built-in photos and of the Debian desktop backgrounds installed here
(`/usr/share/backgrounds`, `/usr/share/wallpapers`; photos and some renders). Output:
``bench/results/draft.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> None:
    from PIL import Image

    from infenclave.enclave.imaging import decode_image, draft_side, normalise, prepare, resize_and_crop
    from infenclave.models import load_model
    from infenclave.predict import Predictor
    from infenclave.sample_images import builtin_images

    model = load_model("efficientnet-lite0")
    pre = model.preprocess
    predictor = Predictor(model)
    paths = [p for p in builtin_images().values() if p.suffix.lower() in (".jpg", ".jpeg")]
    for root in (Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers")):
        paths += sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    rows, t_full, t_draft = [], 0.0, 0.0
    for path in paths:
        data = path.read_bytes()
        try:
            size = Image.open(path).size
            t0 = time.perf_counter()
            full = normalise(resize_and_crop(decode_image(data, draft_side=None), pre), pre)
            t1 = time.perf_counter()
            drafted = prepare(data, pre)
            t2 = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - a file the decoder refuses is skipped, named
            rows.append({"file": str(path), "skipped": type(exc).__name__})
            continue
        if min(size) <= 2 * draft_side(pre):
            continue  # not drafted: identical by construction
        t_full, t_draft = t_full + t1 - t0, t_draft + t2 - t1
        a, b = _top5(predictor, full), _top5(predictor, drafted)
        rows.append(
            {
                "file": str(path),
                "size": list(size),
                "top1_same": a[0] == b[0],
                "top5_same_order": a == b,
                "top5_same_set": set(a) == set(b),
                "top5_overlap": len(set(a) & set(b)),
            }
        )
    done = [r for r in rows if "skipped" not in r]
    summary = {
        "photos_drafted": len(done),
        "top1_agreement": float(np.mean([r["top1_same"] for r in done])),
        "top5_same_set": float(np.mean([r["top5_same_set"] for r in done])),
        "top5_same_order": float(np.mean([r["top5_same_order"] for r in done])),
        "mean_top5_overlap": float(np.mean([r["top5_overlap"] for r in done])),
        "decode_preprocess_s_full": round(t_full, 2),
        "decode_preprocess_s_draft": round(t_draft, 2),
        "draft_side": draft_side(pre),
    }
    out = HERE / "results" / "draft.json"
    out.write_text(json.dumps({"summary": summary, "photos": rows}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


def _top5(predictor, x: np.ndarray) -> list[int]:
    logits = np.asarray(predictor._part(x)[0]).reshape(-1)  # (classes,) scores, as Predictor.scores
    return [int(i) for i in np.argsort(-logits)[:5]]


if __name__ == "__main__":
    main()
