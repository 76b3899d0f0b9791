"""Sample-quality metrics: clean-fid FID and KID, Inception Score, conditional accuracy, diversity.

Features come from one of two extractors, both called the way clean-fid calls its own
(`model(batch)` on float RGB images in [0, 255], after clean-fid's per-image resize):
  * `inception`: clean-fid's Inception (mode="clean"), the standard FID;
  * `classifier`: the penultimate layer of the project's dataset classifier, a dataset-specific
    FID that works offline and is meaningful for 28x28 grayscale clothes.
The distances themselves are clean-fid's (`frechet_distance`, `kernel_distance`).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .console import Progress

INCEPTION_FILE = "inception-2015-12-05.pt"
DIVERSITY_FLAG = 0.8  # a class whose samples are < 0.8x as spread out as the real ones is flagged as collapsed


class MetricsError(RuntimeError):
    """A metric cannot be computed here (missing weights, too few samples)."""


@dataclass
class FeatureExtractor:
    """`model(batch)` -> (B, D) features, and clean-fid's per-image resize for it."""

    name: str
    model: Callable[[torch.Tensor], torch.Tensor]
    resize: Callable[[np.ndarray], np.ndarray]
    device: torch.device
    logits: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # class probabilities' logits, for IS / accuracy


def inception_extractor(device: torch.device) -> FeatureExtractor:
    """clean-fid's Inception in mode='clean'. Offline, its weights must already be in clean-fid's folder."""
    from cleanfid.features import build_feature_extractor
    from cleanfid.resize import build_resizer

    folder = "./" if platform.system() == "Windows" else "/tmp"
    weights = Path(folder) / INCEPTION_FILE
    try:
        model = build_feature_extractor("clean", device=device, use_dataparallel=False)
    except Exception as err:  # urllib errors, timeouts, a truncated download
        raise MetricsError(
            f"clean-fid could not load the Inception weights {INCEPTION_FILE} ({type(err).__name__}: {err}). "
            f"Download https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE} "
            f"and put it at {weights.resolve()}, or use --features classifier (offline)"
        ) from None
    base = torch.jit.load(str(weights), map_location=device).eval()

    def logits(x: torch.Tensor) -> torch.Tensor:
        # The same network's 1008-way head: what the Inception Score is defined on.
        return base(x, return_features=False)[:, :1008]

    return FeatureExtractor("inception", model, build_resizer("clean"), device, logits)


def classifier_extractor(classifier: torch.nn.Module, device: torch.device) -> FeatureExtractor:
    """The project's dataset classifier as a clean-fid custom feature extractor (no resizing)."""
    classifier = classifier.to(device).eval()
    channels = classifier.config.channels

    def prepare(x: torch.Tensor) -> torch.Tensor:
        x = x[:, :channels] if channels == 1 else x  # clean-fid hands over RGB; grayscale has equal channels
        return x.float() / 127.5 - 1.0

    def model(x: torch.Tensor) -> torch.Tensor:
        return classifier.features(prepare(x))

    def logits(x: torch.Tensor) -> torch.Tensor:
        return classifier(prepare(x))

    return FeatureExtractor("classifier", model, lambda image: image, device, logits)


def _rgb_numpy(images: torch.Tensor) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, H, W, 3), what clean-fid's loader makes of an image file."""
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(array, 3, axis=3) if array.shape[3] == 1 else array


@torch.no_grad()
def extract(images: torch.Tensor, extractor: FeatureExtractor, batch_size: int = 256,
            with_logits: bool = False, progress: Optional[str] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Features (and logits) of uint8 images, computed exactly as clean-fid's folder loader would.
    `progress`: what to call the progress lines (`console.Progress`); None: silent."""
    rgb = _rgb_numpy(images)
    feats, logits = [], []
    with Progress(progress or "", len(rgb), show=progress is not None) as shown:
        for start in range(0, len(rgb), batch_size):
            chunk = np.stack([extractor.resize(img) for img in rgb[start: start + batch_size]])
            batch = torch.from_numpy(chunk.transpose(0, 3, 1, 2).astype(np.float32)).to(extractor.device)
            feats.append(extractor.model(batch).float().cpu().numpy())
            if with_logits and extractor.logits is not None:
                logits.append(extractor.logits(batch).float().cpu().numpy())
            shown.update(len(chunk))
    return np.concatenate(feats), (np.concatenate(logits) if logits else None)


def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    from cleanfid.fid import frechet_distance

    if min(len(feats_a), len(feats_b)) < 2:
        raise MetricsError("FID needs at least 2 images on each side")
    mu_a, sigma_a = feats_a.mean(0), np.cov(feats_a, rowvar=False)
    mu_b, sigma_b = feats_b.mean(0), np.cov(feats_b, rowvar=False)
    try:
        return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))
    except TypeError as err:  # clean-fid 0.1.35 passes `disp` to scipy's sqrtm, which newer scipy rejects
        if "disp" not in str(err):
            raise
        return _frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


def _frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """clean-fid's formula (with its regularisation of a singular product), on today's scipy."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kid(feats_a: np.ndarray, feats_b: np.ndarray, seed: int = 0) -> float:
    """clean-fid's KID; its subset draws use NumPy's global RNG, so seed it and put it back afterwards."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(feats_a, feats_b, num_subsets=100, max_subset_size=1000))
    finally:
        np.random.set_state(state)


def inception_score(logits: np.ndarray, splits: int = 10) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over `splits` chunks as in Salimans et al. (2016)."""
    probs = torch.from_numpy(logits).double().softmax(1)
    # Shuffle first: samples arrive sorted by class, and a one-class chunk would score exp(0) = 1.
    probs = probs[torch.randperm(len(probs), generator=torch.Generator().manual_seed(0))]
    scores = []
    for chunk in probs.chunk(min(splits, len(probs))):
        marginal = chunk.mean(0, keepdim=True)
        kl = (chunk * (chunk.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def mean_pairwise_distance(feats: np.ndarray, max_points: int = 500) -> float:
    x = torch.from_numpy(feats[:max_points]).double()
    if len(x) < 2:
        raise MetricsError("diversity needs at least 2 images of a class")
    d = torch.cdist(x, x)
    return float(d.sum() / (len(x) * (len(x) - 1)))


def per_class_report(gen_feats: np.ndarray, gen_labels: np.ndarray, real_feats: np.ndarray, real_labels: np.ndarray,
                     class_names: list[str], predictions: Optional[np.ndarray] = None) -> dict:
    """Per class: FID against that class's real images, diversity ratio, and (with predictions) accuracy."""
    rows = {}
    for k, name in enumerate(class_names):
        g, r = gen_feats[gen_labels == k], real_feats[real_labels == k]
        row = {"n": int(len(g))}
        if len(g) >= 2 and len(r) >= 2:
            row["fid"] = fid(g, r)
            row["diversity_ratio"] = mean_pairwise_distance(g) / mean_pairwise_distance(r)
        if predictions is not None and len(g):
            row["accuracy"] = float((predictions[gen_labels == k] == k).mean())
        rows[name] = row
    return rows


def collapsed_classes(per_class: dict, threshold: float = DIVERSITY_FLAG) -> list[str]:
    return [name for name, row in per_class.items() if row.get("diversity_ratio", 1.0) < threshold]


def combined_score(fid_value: Optional[float], is_value: Optional[float], lpips_value: Optional[float]) -> Optional[float]:
    """Report B's `FID + 10 / max(IS, 0.1) + 10 * LPIPS`, from the parts that exist (None if FID is missing)."""
    if fid_value is None:
        return None
    score = fid_value
    if is_value is not None:
        score += 10.0 / max(is_value, 0.1)
    if lpips_value is not None:
        score += 10.0 * lpips_value
    return float(score)


def lpips_status() -> tuple[bool, str]:
    """LPIPS needs the `lpips` package and ImageNet backbone weights, which it downloads on first use."""
    try:
        import lpips  # noqa: F401  (only whether it imports)
    except ImportError:
        return False, "LPIPS not available: the `lpips` package is not installed (pip install lpips)"
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("alexnet-*.pth")):
        return False, (f"LPIPS not available: its AlexNet backbone weights are not in {hub} and cannot be "
                       "downloaded here")
    return True, "LPIPS (AlexNet) between pairs of same-class samples"


def mean_lpips(images: torch.Tensor, labels: torch.Tensor, pairs_per_class: int = 50, seed: int = 0) -> float:
    """Mean LPIPS between random pairs of same-class samples (higher: more diverse)."""
    import lpips

    metric = lpips.LPIPS(net="alex", verbose=False)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for k in labels.unique():
        idx = (labels == k).nonzero().flatten()
        if len(idx) < 2:
            continue
        a = idx[torch.randint(len(idx), (pairs_per_class,), generator=gen)]
        b = idx[torch.randint(len(idx), (pairs_per_class,), generator=gen)]
        x, y = (images[i].float() / 127.5 - 1 for i in (a, b))
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        with torch.no_grad():
            values.append(metric(x, y).flatten())
    return float(torch.cat(values).mean())

