"""eetool rate on real frames: the split rows' bytes are the sizes of the REQUEST frames the device sends,
the JPEG / WebP rows' the frames of the re-encoded crop, decoded as the server decodes them (the ImageNet
samples beside the repo, else scikit-image's photos)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.readers import read_dataset
from runtime import protocol
from runtime.bundle import Bundle
from runtime.chain import Chain
from runtime.preprocess import model_crop
from toolkit.calibrate import WireCodec
from toolkit.rate import dominance, encode_crop, frontier, plot, RatePoint, run_rate


@pytest.fixture(scope="module")
def rate_report(effnet_bundle, imagenet_source, tmp_path_factory):
    out = effnet_bundle[0]
    report = run_rate([str(out)], imagenet_source, jpeg=[30, 90], webp=[50], wire=[WireCodec(4, False, "minmax")],
                      entropy_coders=["zstd", "brotli"], limit=6)
    return out, report


def _point(report, label_part, kind="split", codec=None):
    got = [p for p in report["points"] if p["kind"] == kind and label_part in p["label"]
           and (codec is None or p["info"].get("codec") == codec)]
    assert len(got) == 1, [p["label"] for p in report["points"]]
    return got[0]


def test_split_bytes_are_real_frames(rate_report, imagenet_source):
    out, report = rate_report
    bundle = Bundle.load(out)
    n = report["samples"]
    assert 1 <= n <= 6
    ds = read_dataset(imagenet_source, bundle.manifest.preprocess, limit=6,
                      exclude=[] if report["excluded_calibration_samples"] == 0 else bundle.manifest.calibration.names)
    feats = Chain(bundle, "device").run_segments({"input": ds.x[:n]})["blocks.5"]
    q = bundle.tensor("blocks.5").quant.params()
    sizes = []
    for i in range(n):
        t = q.quantize(feats[i:i + 1])
        sizes.append(len(protocol.encode_request(i, {"blocks.5": t}, {"blocks.5": q.to_json()}, codec="zstd")))
    own = _point(report, "int8 per-tensor (bundle)", codec="zstd")
    assert own["bytes_mean"] == pytest.approx(np.mean(sizes))
    assert own["bytes_p90"] == pytest.approx(np.percentile(sizes, 90))
    assert own["samples"] == n and own["info"]["bits"] == 8
    four = _point(report, "4-bit per-tensor minmax", codec="zstd")
    assert four["info"]["bits"] == 4 and not four["info"]["per_channel"]
    assert four["bytes_mean"] < 0.6 * own["bytes_mean"]  # 4-bit codes, packed, of the same feature
    assert 0 < four["payload_mean"] < four["bytes_mean"]
    # same codes, other coder: accuracy identical, bytes differ
    four_b = _point(report, "4-bit per-tensor minmax", codec="brotli")
    assert four_b["agreement"] == four["agreement"] and four_b["bytes_mean"] != four["bytes_mean"]
    assert 0.0 <= four["agreement"] <= 1.0


def test_image_rows_are_real_frames(rate_report, imagenet_source):
    out, report = rate_report
    bundle = Bundle.load(out)
    spec = bundle.manifest.preprocess
    n = report["samples"]
    ds = read_dataset(imagenet_source, spec, limit=6,
                      exclude=[] if report["excluded_calibration_samples"] == 0 else bundle.manifest.calibration.names)
    frames = [len(protocol.encode_request(i, {protocol.FILE_TENSOR: np.frombuffer(encode_crop(model_crop(f, spec), "jpeg", 30),
                                                                                   np.uint8)}, codec="none", layout=None))
              for i, f in enumerate(ds.files[:n])]
    jp = _point(report, "JPEG q30", kind="jpeg")
    assert jp["bytes_mean"] == pytest.approx(np.mean(frames))
    # the original file decodes to exactly the float model's input: same answers
    assert _point(report, "original file", kind="file")["agreement"] == 1.0
    assert _point(report, "JPEG q90", kind="jpeg")["bytes_mean"] > jp["bytes_mean"]
    webp = _point(report, "WEBP q50", kind="webp")
    assert webp["info"]["quality"] == 50 and webp["samples"] == n


def test_report_fields(rate_report, tmp_path):
    out, report = rate_report
    labelled = report["float"]["top1"] is not None
    assert all((p["top1"] is None) != labelled for p in report["points"])
    assert {d["image"] for d in report["dominance"]} == {"JPEG q30", "JPEG q90", "WEBP q50", "PNG (lossless)"}
    png = _point(report, "PNG", kind="png")
    assert png["agreement"] == 1.0 and png["bytes_mean"] > _point(report, "JPEG q90", kind="jpeg")["bytes_mean"]
    assert set(report["frontier"]) <= {p["label"] for p in report["points"] if p["kind"] == "split"}
    from PIL import Image

    jpeg_inputs = any(Image.open(p).format == "JPEG" for p in read_dataset(
        report["data"], Bundle.load(out).manifest.preprocess, limit=6).files)
    assert any("second-generation" in n for n in report["notes"]) == jpeg_inputs
    plot(report, tmp_path / "rate.png")
    assert (tmp_path / "rate.png").stat().st_size > 10000
    json.dumps(report)


def test_dominance_and_frontier_logic():
    def pt(kind, label, b, top1):
        return RatePoint(kind, label, b, b, b, top1, 1.0, 10)

    pts = [pt("split", "s8", 13000, 0.75), pt("split", "s4", 5000, 0.74), pt("split", "s2", 3000, 0.60),
           pt("split", "bad", 9000, 0.70), pt("jpeg", "J50", 7000, 0.70), pt("jpeg", "J90", 17000, 0.76),
           pt("webp", "W50", 4000, 0.70)]
    d = {x["image"]: x["dominated_by"] for x in dominance(pts)}
    assert d == {"J50": "s4", "J90": None, "W50": None}
    assert [p.label for p in frontier(pts)] == ["s2", "s4", "s8"]


def test_bench_page_has_the_rate_section(rate_report, tmp_path):
    import argparse

    from runtime.report import rate_claims, render_summary, run

    _, report = rate_report
    page = render_summary([], [], "t", rates=[report])
    assert "## Rate vs accuracy" in page and "JPEG q30" in page and "original file" in page
    dom = rate_claims(report)[0]
    missed = [d["image"] for d in report["dominance"] if not d["dominated_by"]]
    assert ("does NOT dominate" in dom) == bool(missed)
    f = tmp_path / "rate.json"
    f.write_text(json.dumps(report))
    args = argparse.Namespace(out=str(tmp_path / "page.md"), bench=[], plan=[], rate=[str(f)], title="t")
    assert run(args) == 0 and "Rate vs accuracy" in (tmp_path / "page.md").read_text()
    (tmp_path / "bad.json").write_text(json.dumps({"points": []}))
    with pytest.raises(ValueError, match="not a rate report"):
        run(argparse.Namespace(out=str(tmp_path / "p2.md"), bench=[], plan=[], rate=[str(tmp_path / "bad.json")],
                               title="t"))


def test_array_inputs_recover_their_8bit_images():
    from calibration.fashion_mnist import PREPROCESS, load_fashion_mnist, to_input
    from toolkit.rate import _decode_array_image, array_crops

    images, _ = load_fashion_mnist("test")
    x = to_input(images[:5])
    crops = array_crops(x, PREPROCESS)
    assert [c.mode for c in crops] == ["L"] * 5
    np.testing.assert_array_equal(np.stack([np.asarray(c) for c in crops]), images[:5])
    png = encode_crop(crops[0], "png")
    np.testing.assert_array_equal(_decode_array_image(png, PREPROCESS, 1), x[0])  # lossless: the same input
    with pytest.raises(ValueError, match="not 8-bit images"):
        array_crops(x + 0.01, PREPROCESS)


def test_cli_refuses_bad_wire_options(effnet_bundle):
    from click.testing import CliRunner

    from toolkit.cli import main

    r = CliRunner().invoke(main, ["export", "efficientnet-lite0", "--split", "blocks.5", "--wire-bits", "9", "-o", "x"])
    assert r.exit_code == 2 and "9 is not in the range 2<=x<=8" in r.output
    r = CliRunner().invoke(main, ["rate", str(effnet_bundle[0]), "--wire-bits", "4,1"])
    assert r.exit_code == 2 and "bits are 2..8" in r.output
    r = CliRunner().invoke(main, ["rate", str(effnet_bundle[0]), "--jpeg", "10,x"])
    assert r.exit_code == 2 and "comma-separated integers" in r.output
    r = CliRunner().invoke(main, ["rate", str(effnet_bundle[0]), "--codecs", "gzip"])
    assert r.exit_code == 2 and "unknown codec 'gzip'" in r.output


def test_the_second_generation_note_counts_the_lossy_inputs(tmp_path):
    """All JPEG: 'the inputs are'; one JPEG among PNGs: '1 of the 2 inputs are'; all PNG: no note."""
    from PIL import Image

    from toolkit.rate import inputs_already_compressed

    img = Image.fromarray(np.full((16, 16, 3), 120, np.uint8))
    img.save(tmp_path / "a.jpg")
    img.save(tmp_path / "b.png")
    img.save(tmp_path / "c.jpg")
    assert inputs_already_compressed([tmp_path / "a.jpg", tmp_path / "c.jpg"]).startswith("the inputs are already JPEG")
    assert inputs_already_compressed([tmp_path / "a.jpg", tmp_path / "b.png"]).startswith("1 of the 2 inputs are")
    assert inputs_already_compressed([tmp_path / "b.png"]) is None
