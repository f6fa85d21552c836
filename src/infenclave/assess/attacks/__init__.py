"""Inversion attacks per cut point: what an attacker on the host recovers from the IR.

`run_attacks` mounts, at each cut point, the attacks an adversary can mount (white-box
inversion for `knows-weights`, a trained inverse network for `chosen-inputs`, nothing for
`passive`) on held-apart photos, and judges every reconstruction (SSIM, PSNR, recognition and
KL by an independent judge network). `attack_verdict` turns one photo's figures into
safe/unsafe. Heavy imports (torch, ONNX Runtime) happen inside the functions.
"""

from infenclave.assess.attacks.figure import inversion_grid, save_inversion_grid
from infenclave.assess.attacks.metrics import Judge, default_judge_name, kl_of_probabilities, psnr, ssim
from infenclave.assess.attacks.runner import (
    ADVERSARIES,
    ATTACKS,
    DEFAULT_ADVERSARY,
    AttackResults,
    Budgets,
    CutAttackResult,
    ImageResult,
    ProgressEvent,
    attacks_for,
    load_eval_images,
    run_attacks,
)
from infenclave.assess.attacks.training_data import TrainingSet, pixel_sha256, training_photos
from infenclave.assess.attacks.verdict import TINY_IMAGE_SIDE, attack_verdict

__all__ = [
    "ADVERSARIES",
    "ATTACKS",
    "DEFAULT_ADVERSARY",
    "TINY_IMAGE_SIDE",
    "AttackResults",
    "Budgets",
    "CutAttackResult",
    "ImageResult",
    "Judge",
    "ProgressEvent",
    "TrainingSet",
    "attack_verdict",
    "attacks_for",
    "default_judge_name",
    "inversion_grid",
    "kl_of_probabilities",
    "load_eval_images",
    "pixel_sha256",
    "psnr",
    "run_attacks",
    "save_inversion_grid",
    "ssim",
    "training_photos",
]
