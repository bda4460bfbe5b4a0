"""ReLabel label maps: dense scores as the pooled classifier per location, top-k storage, and LabelPooling against a
brute-force bilinear reference (boxes, flips, the axis order and the non-top-k fill)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.labeling.label_maps import (densify, dense_scores, label_pool, load_maps, save_maps, topk_maps)
from stages.train.augment import CropFlipParams, crop_flip, crop_flip_boxes
from stages.train.networks import create_network


def bilinear(v: np.ndarray, y: float, x: float) -> np.ndarray:
    """torchvision's RoIAlign bilinear sample of a (C, S, S) map at (y, x): zero beyond one pixel outside, clamped."""
    s = v.shape[-1]
    if y < -1.0 or y > s or x < -1.0 or x > s:
        return np.zeros(v.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= s - 1:
        yl = yh = s - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= s - 1:
        xl = xh = s - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    return ((1 - ly) * (1 - lx) * v[:, yl, xl] + (1 - ly) * lx * v[:, yl, xh] + ly * (1 - lx) * v[:, yh, xl]
            + ly * lx * v[:, yh, xh])


def reference_pool(index, score, boxes, flips, num_classes, fill="zero") -> np.ndarray:
    """Brute force: dense map by loops; a flipped view samples the *mirrored map* (not a mirrored box); RoIAlign 1x1
    as an explicit average of bilinear samples on ceil(h) x ceil(w) points of the box; softmax."""
    out = []
    for i in range(len(index)):
        k, s = index.shape[1], index.shape[-1]
        dense = np.zeros((num_classes, s, s))
        present = np.zeros((num_classes, s, s))
        for j in range(k):
            for y in range(s):
                for x in range(s):
                    dense[index[i, j, y, x], y, x] = score[i, j, y, x]
                    present[index[i, j, y, x], y, x] = 1
        if flips[i]:
            dense, present = dense[:, :, ::-1], present[:, :, ::-1]
        x1, y1, x2, y2 = (float(b) * s - 0.5 for b in boxes[i])
        h, w = max(y2 - y1, 1.0), max(x2 - x1, 1.0)
        gh, gw = math.ceil(h), math.ceil(w)
        pts = [(y1 + (a + 0.5) * h / gh, x1 + (b + 0.5) * w / gw) for a in range(gh) for b in range(gw)]
        pooled = sum(bilinear(dense, y, x) for y, x in pts) / len(pts)
        if fill == "neg_inf":
            seen = sum(bilinear(present, y, x) for y, x in pts) > 0
            pooled = np.where(seen, pooled, -np.inf)
        e = np.exp(pooled - pooled.max())
        out.append(e / e.sum())
    return np.array(out)


def roi_align_dense(index, score, boxes, flips, num_classes, fill="zero"):
    """ReLabel's way, literally: the dense zero-filled map through ``torchvision.ops.roi_align`` (1x1, aligned=False)."""
    from torchvision.ops import roi_align

    from stages.labeling.label_maps import roi_boxes

    s = index.shape[-1]
    rois = torch.cat([torch.arange(len(boxes), dtype=torch.float32)[:, None], roi_boxes(boxes, flips, s)], 1)
    pooled = roi_align(densify(index, score, num_classes), rois, 1, 1.0, aligned=False).flatten(1)
    if fill == "neg_inf":
        seen = roi_align(densify(index, torch.ones_like(score), num_classes), rois, 1, 1.0, aligned=False).flatten(1)
        pooled = pooled.masked_fill(seen == 0, float("-inf"))
    return pooled.softmax(1)


@pytest.mark.parametrize("fill", ["zero", "neg_inf"])
def test_label_pool_equals_brute_force_on_random_maps_boxes_and_flips(fill):
    g = np.random.default_rng(0)
    n, c, k, s = 12, 7, 3, 6
    index = np.stack([np.stack([g.permutation(c)[:k] for _ in range(s * s)], 1).reshape(k, s, s) for _ in range(n)])
    score = g.normal(0, 3, (n, k, s, s)).astype(np.float32)
    a, b = np.sort(g.uniform(0, 1, (2, n, 2)), axis=2)  # x and y extents
    boxes = np.stack([a[:, 0], b[:, 0], a[:, 1], b[:, 1]], 1).astype(np.float32)
    boxes[0] = [0, 0, 1, 1]  # the whole image
    boxes[1] = [0.5, 0.1, 0.52, 0.12]  # smaller than a cell (RoIAlign's min size 1)
    flips = g.uniform(size=n) < 0.5
    flips[:2] = [False, True]
    got = label_pool(torch.from_numpy(index).to(torch.int16), torch.from_numpy(score).half(),
                     torch.from_numpy(boxes), torch.from_numpy(flips), c, fill=fill)
    ref = reference_pool(index, score.astype(np.float16).astype(np.float64), boxes, flips, c, fill)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-6)
    dense = roi_align_dense(torch.from_numpy(index), torch.from_numpy(score).half(), torch.from_numpy(boxes),
                            torch.from_numpy(flips), c, fill)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-7)  # the sparse form is torchvision's RoIAlign
    assert np.allclose(got.sum(1).numpy(), 1)
    if fill == "neg_inf":
        assert (got.numpy() == 0).any(), "classes in no top-k under the box get no mass"


def test_zero_fill_keeps_mass_on_non_topk_classes_as_published():
    index = torch.zeros(1, 1, 2, 2, dtype=torch.int16)
    score = torch.full((1, 1, 2, 2), 2.0).half()
    box, flip = torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([False])
    zero = label_pool(index, score, box, flip, 4)
    assert torch.allclose(zero, torch.tensor([[math.e ** 2, 1, 1, 1]]) / (math.e ** 2 + 3))
    assert torch.allclose(label_pool(index, score, box, flip, 4, fill="neg_inf"), torch.tensor([[1.0, 0, 0, 0]]))


def corner_map(s: int = 8, num_classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1 only in the top-right quarter (rows < s/2, columns >= s/2), class 0 elsewhere, class 2 nowhere."""
    index = torch.zeros(1, 1, s, s, dtype=torch.int16)
    index[0, 0, : s // 2, s // 2:] = 1
    return index, torch.full((1, 1, s, s), 5.0).half()


def test_box_axis_order_a_crop_of_the_corner_gets_the_corners_class():
    index, score = corner_map()
    top_right = torch.tensor([[0.5, 0.0, 1.0, 0.5]])  # x1, y1, x2, y2
    bottom_left = torch.tensor([[0.0, 0.5, 0.5, 1.0]])  # the same box with x and y swapped
    no = torch.tensor([False])
    assert label_pool(index, score, top_right, no, 3).argmax().item() == 1
    assert label_pool(index, score, bottom_left, no, 3).argmax().item() == 0
    # a flip before the crop: the top-right of the mirrored image is the top-left of the mapped one
    assert label_pool(index, score, top_right, torch.tensor([True]), 3).argmax().item() == 0


def test_crop_flip_boxes_are_the_crops_of_the_image_and_the_same_views_as_crop_flip():
    """The box crop_flip_boxes reports covers exactly the pixels the view shows (zero padding: no reflections),
    flipped or not; and it draws exactly what crop_flip draws."""
    s = 16
    x = (torch.arange(s * s, dtype=torch.float32) + 1).view(1, 1, s, s).repeat(64, 1, 1, 1)
    params = CropFlipParams(pad=4, padding_mode="zeros")
    plain = crop_flip(x, params, torch.Generator().manual_seed(3))
    views, boxes, flips = crop_flip_boxes(x, params, torch.Generator().manual_seed(3))
    assert torch.equal(plain, views) and flips.any() and (~flips).any()
    for v, b, f in zip(views, boxes, flips):
        src = x[0, 0].flip(1) if f else x[0, 0]  # flip-then-crop convention
        x1, y1, x2, y2 = (round(float(t) * s) for t in b)
        shown = v[0][v[0] != 0]
        assert torch.equal(torch.sort(shown).values, torch.sort(src[y1:y2, x1:x2].flatten()).values)


def test_crop_of_a_corner_through_the_augmentation_gets_the_corners_class():
    """End to end through crop_flip_boxes: an image whose map has class 1 only top-right; views mostly showing the
    top-right get class 1, views mostly elsewhere class 0, whatever the flip."""
    s = 8
    index, score = corner_map(s)
    x = torch.zeros(256, 3, 32, 32)
    _, boxes, flips = crop_flip_boxes(x, CropFlipParams(pad=16), torch.Generator().manual_seed(0))
    t = label_pool(index.expand(256, -1, -1, -1), score.expand(256, -1, -1, -1), boxes, flips, 3)
    from stages.labeling.label_maps import map_boxes

    mb = map_boxes(boxes, flips)  # in the map's coordinates: the fraction of the box inside the top-right quarter
    area = (mb[:, 2] - mb[:, 0]) * (mb[:, 3] - mb[:, 1])
    inter = (mb[:, 2] - mb[:, 0].clamp(min=0.5)).clamp(min=0) * (mb[:, 3].clamp(max=0.5) - mb[:, 1]).clamp(min=0)
    frac = inter / area
    assert ((t[:, 1] > t[:, 0]) == (frac > 0.5))[(frac - 0.5).abs() > 0.1].all()
    assert (frac > 0.6).any() and (frac < 0.4).any() and flips.any()


@pytest.mark.parametrize("name", ["resnet18", "airbench"])
def test_dense_scores_average_to_the_networks_logits(name):
    """The 1x1-conv head at every location, pooled the way the network pools, gives the network's own logits."""
    torch.manual_seed(0)
    net = create_network(name, num_classes=5, image_size=32, width=8).eval()
    x = torch.randn(3, 3, 32, 32)
    if name == "airbench":
        net.init_from_data(x)
    scores = dense_scores(net, x)
    assert scores.shape == ((3, 5, 4, 4) if name == "resnet18" else (3, 5, 3, 3))  # airbench's stem: 31 -> 15 -> 7 -> 3
    if name == "resnet18":  # linear head commutes with the average pool
        torch.testing.assert_close(scores.mean((2, 3)), net(x), rtol=1e-4, atol=1e-5)
    else:  # max pooling does not commute: check one location against the head applied to its feature vector
        feats = net.groups(torch.nn.functional.gelu(net.whiten(x)))
        torch.testing.assert_close(scores[:, :, 1, 2], net.head(feats[:, :, 1, 2]) * net.logit_scale)
    assert dense_scores(net, x, size=6).shape == (3, 5, 6, 6)


def test_convnet_is_refused_with_a_reason():
    net = create_network("convnet", num_classes=5, image_size=32, width=8, depth=2)
    with pytest.raises(ValueError, match="flattens"):
        dense_scores(net, torch.randn(1, 3, 32, 32))


def test_topk_maps_and_sidecar_round_trip(tmp_path):
    scores = torch.randn(4, 6, 3, 3)
    index, score = topk_maps(scores, 2)
    assert index.dtype == np.int16 and score.dtype == np.float16 and index.shape == (4, 2, 3, 3)
    assert (index[:, 0] == scores.argmax(1).numpy()).all() and (score[:, 0] >= score[:, 1]).all()
    dense = densify(torch.from_numpy(index), torch.from_numpy(score), 6)
    assert torch.allclose(dense.max(1).values, scores.max(1).values, atol=1e-2)
    save_maps(tmp_path / "maps" / "train" / "00000.npz", ["a", "b"], index[:2], score[:2])
    save_maps(tmp_path / "maps" / "train" / "00001.npz", ["c", "d"], index[2:], score[2:])
    maps = load_maps(tmp_path, "train", ["d", "a"])
    assert np.array_equal(maps.index.numpy(), index[[3, 0]]) and maps.k == 2 and maps.size == 3
    with pytest.raises(Exception, match="no label map"):
        load_maps(tmp_path, "train", ["zz"])


def test_each_row_is_mapped_by_the_fold_that_held_it_out(tmp_path):
    """K-fold teachers: a row's map comes from the fold whose held-out set holds it (never a model that saw it)."""
    from stages.labeling.label_maps import _fold_of_rows

    (tmp_path / "teachers").mkdir()
    for k, held in enumerate([["b", "d"], ["a"], ["c", "e"]]):
        torch.save({"held_out": held}, tmp_path / "teachers" / f"fold_{k}.pt")
    ckpts, fold = _fold_of_rows(tmp_path, ["a", "b", "c", "d", "e"])
    assert [p.name for p in ckpts] == ["fold_0.pt", "fold_1.pt", "fold_2.pt"]
    assert fold.tolist() == [1, 0, 2, 0, 2]
