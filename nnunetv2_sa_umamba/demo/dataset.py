"""A small synthetic lesion-segmentation dataset in nnU-Net's raw format, for the demo and the tests.

Each case is an RGB skin-like image: a smooth colour gradient, mottled texture, pixel noise, a few unlabelled
distractors (freckles, hairs) and 0-3 irregular lesion-like blobs whose colour contrast varies from faint to
strong. The label marks the blobs (1) on background (0). Everything is seeded per case, so a case does not
change when the number of cases does.

Layout written (nnU-Net v2 raw format)::

    <raw_folder>/Dataset<ID>_<NAME>/
        dataset.json
        imagesTr/case_000_0000.png  (H, W, 3) uint8     labelsTr/case_000.png  (H, W) uint8 in {0, 1}
        imagesTs/test_000_0000.png                      labelsTs/test_000.png  (held out)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from PIL import Image
from scipy import ndimage

DEMO_DATASET_ID = 950
DEMO_DATASET_NAME = "SAUMambaDemo"
FILE_ENDING = ".png"
LABELS = {"background": 0, "lesion": 1}
# seed streams, so that test cases never coincide with training cases
TRAIN_STREAM, TEST_STREAM = 0, 1


def dataset_folder_name(dataset_id: int = DEMO_DATASET_ID, name: str = DEMO_DATASET_NAME) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """(size, size) float noise with unit standard deviation and correlation length ~sigma pixels."""
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return noise / (noise.std() + 1e-8)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) float image in [0, 255] (skin tone, illumination gradient, mottled texture) and its
    base colour (3,)."""
    base = np.array([205.0, 160.0, 135.0]) * rng.uniform(0.8, 1.1) + rng.normal(0, 6, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0.05, 0.2) * (np.cos(angle) * xx + np.sin(angle) * yy)
    vignette = -rng.uniform(0.0, 0.25) * (xx ** 2 + yy ** 2)
    texture = rng.uniform(3, 8) * _smooth_noise(rng, size, sigma=rng.uniform(1.5, 4))
    shading = 1 + gradient + vignette
    return base[None, None, :] * shading[..., None] + texture[..., None] * np.array([1.0, 0.8, 0.7]), base


def _blob_mask(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """(size, size) bool: a star-shaped blob whose radius varies with angle (a few random harmonics)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    dy, dx = yy - centre[0], xx - centre[1]
    theta = np.arctan2(dy, dx)
    boundary = np.ones_like(theta)
    for k in range(2, 6):
        boundary += rng.uniform(0, 0.25 / k ** 0.5) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) <= radius * boundary


def _add_lesion(rng: np.random.Generator, image: np.ndarray, skin: np.ndarray, mask: np.ndarray) -> None:
    """Blend a brownish, internally mottled lesion with a soft edge into ``image`` (in place). Its colour is
    relative to the ``skin`` colour (3,), so that even the faintest lesion stays visible."""
    size = image.shape[0]
    contrast = rng.uniform(0.35, 1.0)
    lesion_colour = skin * np.array([0.55, 0.45, 0.4]) * rng.uniform(0.8, 1.15) + rng.normal(0, 6, 3)
    mottling = 1 + 0.12 * _smooth_noise(rng, size, sigma=1.5)
    alpha = contrast * ndimage.gaussian_filter(mask.astype(float), rng.uniform(0.5, 1.2))
    target = lesion_colour[None, None, :] * mottling[..., None]
    image += alpha[..., None] * (target - image)


def _add_distractors(rng: np.random.Generator, image: np.ndarray) -> None:
    """Unlabelled look-alikes: tiny dark freckles and thin hairs (in place)."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    for _ in range(rng.integers(0, 4)):
        centre = rng.uniform(0, size, 2)
        freckle = np.hypot(yy - centre[0], xx - centre[1]) <= rng.uniform(0.8, 1.8)
        image[freckle] *= rng.uniform(0.6, 0.85)
    for _ in range(rng.integers(0, 3)):
        p0, direction = rng.uniform(0, size, 2), rng.normal(size=2)
        normal = np.array([-direction[1], direction[0]]) / np.linalg.norm(direction)
        distance = np.abs((yy - p0[0]) * normal[0] + (xx - p0[1]) * normal[1])
        image *= 1 - 0.5 * np.exp(-(distance / 0.6) ** 2)[..., None]


def synthesize_case(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One case: image (size, size, 3) uint8 RGB and label (size, size) uint8 in {0, 1}."""
    image, skin = _background(rng, size)
    label = np.zeros((size, size), dtype=bool)
    num_lesions = rng.choice(4, p=[0.1, 0.5, 0.3, 0.1])
    for _ in range(num_lesions):
        radius = rng.uniform(0.08, 0.22) * size
        centre = rng.uniform(radius, size - radius, 2)
        mask = _blob_mask(rng, size, centre, radius)
        _add_lesion(rng, image, skin, mask)
        label |= mask
    _add_distractors(rng, image)
    image += rng.normal(0, rng.uniform(2, 6), image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), label.astype(np.uint8)


def _write_case(rng: np.random.Generator, size: int, images_dir: Path, labels_dir: Path, case_id: str) -> None:
    image, label = synthesize_case(rng, size)
    Image.fromarray(image, mode="RGB").save(images_dir / f"{case_id}_0000{FILE_ENDING}")
    Image.fromarray(label, mode="L").save(labels_dir / f"{case_id}{FILE_ENDING}")


def generate_demo_dataset(raw_folder: str | Path, num_train: int = 100, num_test: int = 20, image_size: int = 64,
                          seed: int = 0, dataset_id: int = DEMO_DATASET_ID) -> Path:
    """Write the dataset into ``raw_folder/Dataset<ID>_SAUMambaDemo`` and return that folder."""
    if num_train < 5:
        raise ValueError(f"num_train must be at least 5 (nnU-Net's 5-fold split needs 5 cases), got {num_train}")
    if num_test < 1:
        raise ValueError(f"num_test must be at least 1, got {num_test}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    folder = Path(raw_folder) / dataset_folder_name(dataset_id)
    splits = (("Tr", TRAIN_STREAM, num_train, "case"), ("Ts", TEST_STREAM, num_test, "test"))
    for split, stream, count, prefix in splits:
        images_dir, labels_dir = folder / f"images{split}", folder / f"labels{split}"
        images_dir.mkdir(parents=True, exist_ok=True)
        labels_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng([seed, stream, index])
            _write_case(rng, image_size, images_dir, labels_dir, f"{prefix}_{index:03d}")
    generate_dataset_json(
        str(folder), channel_names={0: "R", 1: "G", 2: "B"}, labels=dict(LABELS), num_training_cases=num_train,
        file_ending=FILE_ENDING, dataset_name=dataset_folder_name(dataset_id),
        description=f"Synthetic skin-lesion-like blobs on textured background ({image_size}x{image_size} RGB), "
                    f"seed {seed}; imagesTs/labelsTs are held out.",
        license="CC0 (synthetic data)", converted_by="nnunetv2_sa_umamba.demo.dataset",
        numTest=num_test,
    )
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic SA-UMamba demo dataset in nnU-Net raw format.")
    parser.add_argument("-o", "--raw-folder", required=True, help="nnUNet_raw folder to write the dataset into")
    parser.add_argument("--num-train", type=int, default=100)
    parser.add_argument("--num-test", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-d", "--dataset-id", type=int, default=DEMO_DATASET_ID)
    args = parser.parse_args(argv)
    folder = generate_demo_dataset(args.raw_folder, args.num_train, args.num_test, args.image_size, args.seed,
                                   args.dataset_id)
    print(folder)


if __name__ == "__main__":
    main()
