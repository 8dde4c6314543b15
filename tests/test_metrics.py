"""cdcompile.metrics: float PSNR, per-channel SSIM (scikit-image), MSE, max abs error, and the CLI."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")
from PIL import Image  # noqa: E402

from cdcompile import metrics  # noqa: E402


def _uint8_wrapping_psnr(a: np.ndarray, b: np.ndarray) -> float:
    # The bug the module fixes: differences and squares taken in uint8 wrap modulo 256.
    err = float(np.mean((a - b) ** 2))
    return math.inf if err == 0 else 10 * math.log10(255.0 ** 2 / err)


def _image(seed: int, shape=(24, 20, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_identical_images_give_infinite_psnr_unit_ssim_and_zero_errors():
    a = _image(0)
    out = metrics.compare(a, a.copy())
    assert out == {"psnr": math.inf, "ssim": 1.0, "mse": 0.0, "max_abs_error": 0.0}


def test_psnr_matches_hand_computed_value():
    a = np.zeros((16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[3, 5, 1] = 10  # one channel of one pixel off by 10: MSE = 100 / 768
    expected = 10 * math.log10(255 ** 2 * 768 / 100)
    assert metrics.mse(a, b) == pytest.approx(100 / 768, rel=1e-12)
    assert metrics.max_abs_error(a, b) == 10.0
    assert metrics.psnr(a, b) == pytest.approx(expected, rel=1e-12)  # 46.98 dB


def test_psnr_is_computed_in_float_where_uint8_arithmetic_wraps():
    a = np.zeros((16, 16, 3), dtype=np.uint8)
    b = np.full_like(a, 16)
    # uint8: 0 - 16 = 240, 240**2 = 57600 = 0 (mod 256): the wrapping PSNR calls them identical.
    assert _uint8_wrapping_psnr(a, b) == math.inf
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 256), rel=1e-12)  # 24.05 dB
    assert metrics.psnr(b, a) == metrics.psnr(a, b)


def test_data_range_is_255_for_uint8_and_1_for_float_unless_given():
    a, b = _image(1), _image(2)
    p8 = metrics.psnr(a, b)
    assert metrics.psnr(a / 255.0, b / 255.0) == pytest.approx(p8, rel=1e-12)
    assert metrics.psnr(a / 127.5 - 1, b / 127.5 - 1, data_range=2.0) == pytest.approx(p8, rel=1e-12)
    assert metrics.ssim(a / 255.0, b / 255.0) == pytest.approx(metrics.ssim(a, b), rel=1e-9)
    with pytest.raises(ValueError, match="different units"):
        metrics.psnr(a, b / 255.0)
    with pytest.raises(ValueError, match="different units"):
        metrics.mse(a, b / 255.0)


def test_torch_tensors_are_channels_first_and_agree_with_numpy():
    a, b = _image(3), _image(4)
    ta = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    tb = torch.from_numpy(b).permute(2, 0, 1).float() / 255
    want = metrics.compare(a / 255.0, b / 255.0)
    got = metrics.compare(ta, tb)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
    # a batch of two reports the mean PSNR/SSIM of its images
    batch = metrics.compare(torch.stack([ta, ta]), torch.stack([tb, ta]))
    assert batch["psnr"] == math.inf
    assert batch["ssim"] == pytest.approx((want["ssim"] + 1.0) / 2, rel=1e-6)


def test_ssim_is_the_mean_of_per_channel_ssims_and_drops_with_noise():
    rng = np.random.default_rng(5)
    ramp = np.linspace(0, 1, 32)
    a = np.stack([np.add.outer(ramp, ramp) / 2, np.outer(ramp, ramp), np.full((32, 32), 0.5)], axis=-1)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    per_channel = [metrics.ssim(a[..., c], b[..., c]) for c in range(3)]
    assert metrics.ssim(a, b) == pytest.approx(np.mean(per_channel), rel=1e-12)
    noisier = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    assert 1.0 > metrics.ssim(a, b) > metrics.ssim(a, noisier) > 0.0


def test_bad_inputs_raise_value_error_with_shapes():
    with pytest.raises(ValueError, match=r"\(1, 16, 16, 3\) vs \(1, 16, 17, 3\)"):
        metrics.psnr(np.zeros((16, 16, 3)), np.zeros((16, 17, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(np.zeros((8, 8, 3)), np.ones((8, 8, 3)))


def _write_pngs(folder, images):
    folder.mkdir()
    for name, arr in images.items():
        Image.fromarray(arr).save(folder / name)


def test_cli_pairs_folders_by_name_and_writes_a_summary(tmp_path, capsys):
    a0, a1, b1 = _image(10), _image(11), _image(12)
    _write_pngs(tmp_path / "ref", {"x.png": a0, "y.png": a1, "only_ref.png": a0})
    _write_pngs(tmp_path / "new", {"x.png": a0, "y.png": b1})
    out = tmp_path / "s" / "summary.json"
    assert metrics.main([str(tmp_path / "ref"), str(tmp_path / "new"), "--summary", str(out)]) == 0
    printed = capsys.readouterr()
    assert "only_ref.png only in" in printed.err
    doc = json.loads(out.read_text())
    assert [p["name"] for p in doc["pairs"]] == ["x.png", "y.png"]
    x, y = doc["pairs"]
    assert x["psnr"] == "inf" and x["ssim"] == 1.0 and x["mse"] == 0.0
    assert y["psnr"] == pytest.approx(metrics.psnr(a1, b1), rel=1e-12)
    assert y["ssim"] == pytest.approx(metrics.ssim(a1, b1), rel=1e-12)
    assert y["max_abs_error"] == float(np.max(np.abs(a1.astype(int) - b1.astype(int))))
    assert doc["mean"]["psnr"] == "inf" and doc["mean"]["ssim"] == pytest.approx((1 + y["ssim"]) / 2)
    assert doc["only_in_reference"] == ["only_ref.png"] and doc["only_in_candidate"] == []
    assert "scikit-image" in doc["ssim"]


def test_cli_reads_saved_tensors_as_channels_first_floats(tmp_path):
    a = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    b = (a + 0.01).clamp(0, 1)
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    out = tmp_path / "summary.json"
    # as a module, the way the console script runs it
    proc = subprocess.run([sys.executable, "-m", "cdcompile.metrics", str(tmp_path / "a.pt"),
                           str(tmp_path / "b.pt"), "--summary", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    pair = json.loads(out.read_text())["pairs"][0]
    assert pair["psnr"] == pytest.approx(metrics.psnr(a, b), rel=1e-9)
    assert pair["max_abs_error"] == pytest.approx(float((b - a).abs().max()), rel=1e-6)


def test_cli_rejects_a_folder_against_a_file(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    Image.fromarray(_image(0)).save(tmp_path / "f.png")
    with pytest.raises(SystemExit) as e:
        metrics.main([str(tmp_path / "d"), str(tmp_path / "f.png")])
    assert e.value.code == 2
    assert "folder with a folder" in capsys.readouterr().err
