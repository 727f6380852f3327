"""Seeded batch augmentation and the record order: pure functions of (seed, epoch, index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ran.data.order import epoch_order
from ran.errors import RanError
from ran.train.augment import (
    PadCropFlip,
    ResizedCropFlip,
    colour_jitter,
    random_erasing,
    record_uniforms,
)
from ran.train.data import holdout_split, load_labels


def test_uniforms_depend_on_the_record_not_the_batch() -> None:
    batch = record_uniforms(3, 7, np.array([5, 9, 2]), 4)
    alone = record_uniforms(3, 7, np.array([9]), 4)
    np.testing.assert_array_equal(batch[1], alone[0])
    assert batch.min() >= 0 and batch.max() < 1
    assert not np.array_equal(record_uniforms(3, 8, np.array([9]), 4), alone)
    assert not np.array_equal(record_uniforms(4, 7, np.array([9]), 4), alone)
    many = record_uniforms(0, 0, np.arange(20_000), 1)
    assert abs(many.mean() - 0.5) < 0.01


def test_pad_crop_flip_moves_pixels_exactly() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    aug = PadCropFlip(side=8, pad=4)
    centre = aug.apply(x, torch.tensor([[4, 4, 0], [4, 4, 1]]))
    assert torch.equal(centre[0], x[0]) and torch.equal(centre[1], x[1].flip(2))
    shifted = aug.apply(x, torch.tensor([[0, 8, 0], [8, 0, 0]]))
    assert torch.equal(shifted[0, :, 4:, :4], x[0, :, :4, 4:])  # down 4, left 4
    assert shifted[0, :, :4].abs().sum() == 0  # zero padding
    assert torch.equal(shifted[1, :, :4, 4:], x[1, :, 4:, :4])


def test_pad_crop_flip_applies_to_a_map_at_twice_the_resolution() -> None:
    """A per-record map at 2x the image's side gets the same crop and flip."""
    image = torch.rand(4, 3, 8, 8)
    as_map = image.repeat_interleave(2, 2).repeat_interleave(2, 3)
    aug = PadCropFlip(side=8)
    params = aug.sample(record_uniforms(0, 0, np.arange(4), aug.uniforms))
    cropped = aug.apply(image, params)
    assert torch.equal(aug.apply(as_map, params)[:, :, ::2, ::2], cropped)


def test_resized_crop_boxes_lie_inside_the_image() -> None:
    aug = ResizedCropFlip(size=16)
    params = aug.sample(record_uniforms(1, 0, np.arange(500), aug.uniforms)).numpy()
    y0, x0, h, w = params[:, :4].T
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 1 + 1e-6).all()
    assert (x0 + w <= 1 + 1e-6).all() and (h * w >= 0.08 - 1e-6).all()
    x = torch.rand(3, 3, 40, 30)
    out = aug.apply(x, aug.sample(record_uniforms(1, 0, np.arange(3), aug.uniforms)))
    assert out.shape == (3, 3, 16, 16)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    whole = aug.apply(torch.ones(1, 3, 20, 20), full)
    assert torch.allclose(whole, torch.ones_like(whole))


def test_colour_and_erasing() -> None:
    x = torch.rand(6, 3, 16, 16)
    u = record_uniforms(0, 0, np.arange(6), 5)
    jittered = colour_jitter(x.clone(), u[:, :3])
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.equal(jittered, x)
    erased = random_erasing(x, u, probability=1.0)
    zero = (erased == 0).flatten(1).float().mean(1)
    assert (zero > 0.01).all() and (zero < 0.5).all()
    assert torch.equal(random_erasing(x, u, probability=0.0), x)


def test_epoch_order_shards_are_disjoint_and_equal() -> None:
    indices = np.arange(103)
    shards = [epoch_order(indices, 0, 2, rank, 3) for rank in range(3)]
    assert {len(s) for s in shards} == {34}
    assert len(set(np.concatenate(shards))) == 102
    assert np.array_equal(epoch_order(indices, 0, 2, 1, 3), shards[1])
    assert not np.array_equal(epoch_order(indices, 0, 3, 1, 3), shards[1])


def test_holdout_is_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(10), 30)
    train, held = holdout_split(labels, 50, seed=0)
    assert len(held) == 50 and np.bincount(labels[held]).tolist() == [5] * 10
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 300
    assert np.array_equal(holdout_split(labels, 50, seed=0)[1], held)
    assert not np.array_equal(holdout_split(labels, 50, seed=1)[1], held)
    with pytest.raises(RanError, match="multiple of the 10 classes"):
        holdout_split(labels, 55, seed=0)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros(9, dtype=np.int64), "has 9 labels but the train split has 10"),
        (np.full(10, 10, dtype=np.int64), "outside \\[0, 10\\)"),
        (np.zeros(10, dtype=np.int32), "expected a 1-D int64"),
    ],
)
def test_bad_labels_file(tmp_path, array: np.ndarray, message: str) -> None:
    path = tmp_path / "labels.npy"
    np.save(path, array)
    with pytest.raises(RanError, match=message):
        load_labels(path, 10, 10)


def test_progressive_resizing_schedule() -> None:
    from ran.config import TrainParams
    from ran.data.beton import LoaderSpec
    from ran.train.augment import BatchTransform

    spec = LoaderSpec((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 32, True)
    ramp = BatchTransform(spec, TrainParams(min_side=16, ramp_start=0.2, ramp_end=0.8), 0)
    sides = [ramp.side(p) for p in (0.0, 0.2, 0.5, 0.8, 1.0)]
    assert sides == [16, 16, 24, 32, 32]
    assert all(side % 4 == 0 for side in (ramp.side(p / 100) for p in range(101)))
    assert ramp.resize(torch.rand(2, 3, 32, 32), 0.0).shape == (2, 3, 16, 16)
    off = BatchTransform(spec, TrainParams(), 0)
    x = torch.rand(2, 3, 32, 32)
    assert off.side(0.0) == 32 and off.resize(x, 0.0) is x
