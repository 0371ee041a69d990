"""Bottleneck injection and head network distillation on the real EfficientNet-Lite0 and real photos, in a
tiny configuration (seconds): PCA initialisation, loss going down from it, determinism, resume, files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calibration.photos import IMAGENET_VIEWS, LARGE_PHOTO_VIEWS, iter_views
from calibration.readers import DataError, image_files, skimage_photo_paths
from toolkit import bottleneck as B
from toolkit.bottleneck_eval import code_grid, wire_round_trip
from toolkit.bottleneck_train import TrainData, train_bottleneck
from toolkit.distill import DistillConfig, FeatureCache, Objective, validate
from toolkit.graph import SplitError
from toolkit.sources import IMAGENET_PREPROCESS, resolve
from runtime.protocol import PREFIX, parse_frame

TINY = DistillConfig(epochs=3, batch=4, lr=3e-4, seed=0, threads=2, pca_samples=64)


@pytest.fixture(scope="module")
def photos_data(tmp_path_factory):
    """The built-in photos: 4 train + 1 validation image (val-every 5)."""
    return TrainData(["samples"], views=3, val_every=5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, effnet, photos_data):
    out = tmp_path_factory.mktemp("bn") / "c8"
    spec = B.BottleneckSpec(split="blocks.3", target="blocks.5", channels=8, bits=4)
    cfg = train_bottleneck(effnet, spec, photos_data, TINY, out)
    return out, cfg


def test_code_grid_is_the_trained_grid_and_round_trips_through_real_frames():
    """The wire codes are rint(clip(z, 0, 1) * (2**bits - 1)) (what fake_quant trains for), sent as the runtime's
    bit-packed REQUEST frame and decoded exactly back to the grid values."""
    z = np.random.default_rng(1).random((1, 6, 14, 14)).astype(np.float32)
    z[0, 0, 0, :3] = [-0.2, 1.7, 0.0]  # clipped; exact half-step ties are left out (x / scale may round them either way)
    for bits in (2, 3, 4, 8):
        frame, back = wire_round_trip(z, bits, "encoder")
        levels = (1 << bits) - 1
        assert np.array_equal(code_grid(bits).quantize(z), np.rint(np.clip(z, 0, 1) * levels).astype(np.uint8))
        assert np.allclose(back, B.fake_quant(torch.from_numpy(np.clip(z, 0, 1)), bits).numpy(), atol=1e-6)
        entry = parse_frame(frame).header["tensors"][0]
        assert entry["bits"] == bits and entry["shape"] == [1, 6, 14, 14]
        assert len(frame) == PREFIX.size + PREFIX.unpack(frame[:PREFIX.size])[5] + len(parse_frame(frame).payload)
    with pytest.raises(ValueError):
        code_grid(1)


def test_pca_init_reconstructs_with_every_component(effnet, calib_images):
    """With C = all 160 values of a 2x2 patch of blocks.3's 40 channels, the PCA pair is the identity up to
    the [0.1, 99.9] percentile clamp; with 16 components it keeps what PCA says it keeps."""
    x = torch.from_numpy(calib_images.x[:8])
    full = B.build(effnet.model, x[:1], B.BottleneckSpec("blocks.3", "blocks.5", channels=160))
    with torch.no_grad():
        feats = full.model.head(x)
    stats = B.pca_init(full.model.encoder, full.model.decoder, feats)
    assert stats["explained_variance"] == pytest.approx(1.0)
    assert stats["relative_mse"] < 0.01
    small = B.build(effnet.model, x[:1], B.BottleneckSpec("blocks.3", "blocks.5", channels=16))
    s16 = B.pca_init(small.model.encoder, small.model.decoder, feats)
    assert 0.2 < s16["explained_variance"] < 1.0
    assert s16["relative_mse"] == pytest.approx(1 - s16["explained_variance"], abs=0.05)
    with torch.no_grad():
        z = small.model.encoder(feats)
    assert z.shape == (8, 16, 14, 14) and float(z.min()) >= 0.0 and float(z.max()) <= 1.0


def test_build_refuses_bad_layers(effnet):
    x = torch.zeros(1, 3, 224, 224)
    with pytest.raises(B.BottleneckError, match="must come after"):
        B.build(effnet.model, x, B.BottleneckSpec("blocks.5", "blocks.3", channels=8))
    with pytest.raises(SplitError, match="unknown split point"):
        B.build(effnet.model, x, B.BottleneckSpec("blocks.33", "blocks.5", channels=8))
    with pytest.raises(B.BottleneckError, match="1..8 bits"):
        B.build(effnet.model, x, B.BottleneckSpec("blocks.3", "blocks.5", channels=8, bits=9))
    with pytest.raises(B.BottleneckError, match="exceed the 160 values"):
        b = B.build(effnet.model, x, B.BottleneckSpec("blocks.3", "blocks.5", channels=200))
        B.pca_init(b.model.encoder, b.model.decoder, torch.randn(4, 40, 28, 28))
    r18 = resolve("resnet18").model
    with pytest.raises(B.BottleneckError, match="crossed by 2 tensors"):
        B.build(r18, x, B.BottleneckSpec("layer2.0.conv1", "layer3", channels=8))
    assert B.default_target(effnet.model, x, "blocks.3", 2) == "blocks.5"
    assert B.default_target(r18, x, "layer2", 2) == "layer3"


def test_views_are_seeded_and_augmented():
    files = skimage_photo_paths()[:2]
    a = list(iter_views(files, 3, IMAGENET_PREPROCESS, seed=7))
    b = list(iter_views(files, 3, IMAGENET_PREPROCESS, seed=7))
    c = list(iter_views(files, 3, IMAGENET_PREPROCESS, seed=8))
    assert [n for n, _ in a] == [f"{files[0].name}#0", f"{files[0].name}#1", f"{files[0].name}#2",
                                 f"{files[1].name}#0", f"{files[1].name}#1", f"{files[1].name}#2"]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert np.array_equal(a[0][1], c[0][1])  # view 0 is the center crop, whatever the seed
    assert not np.array_equal(a[1][1], c[1][1])
    assert not np.array_equal(a[1][1], a[2][1])
    from calibration.readers import read_dataset

    center = read_dataset("samples", IMAGENET_PREPROCESS, limit=1).x[0]
    assert np.abs(a[0][1] - center).max() < 1e-5  # the evaluation view, exactly as the readers make it
    big = list(iter_views(files[:1], 2, IMAGENET_PREPROCESS, seed=0, spec=LARGE_PHOTO_VIEWS))
    assert big[0][1].shape == (3, 224, 224) and not np.array_equal(big[0][1], a[0][1])


def test_fold_files_and_validation_split(imagenet_source):
    files = image_files("samples")
    assert image_files("samples:fold=1/2") == files[1::2]
    with pytest.raises(DataError, match="fold 0/9 is empty|fold spec"):
        image_files("samples:fold=7/9") if len(files) > 7 else image_files("samples:fold=0/9:x")
    train, val, photos = TrainData(["samples"], val_every=2).split_files()
    assert val == files[1::2] and train == files[0::2] and photos == []
    with pytest.raises(DataError, match="cannot be split"):
        TrainData(["samples:fold=0/5"], val_every=2).split_files()


def test_distillation_lowers_the_loss_from_the_pca_init(tiny_run, effnet, photos_data, tmp_path):
    """The same cache, PCA init only (0 epochs) vs 3 epochs of HND: the training loss must go down."""
    out, cfg = tiny_run
    hist = cfg["training"]["history"]
    assert hist["epoch"] == [0, 1, 2, 3]
    train_dir = next((out / "cache").glob("train-*"))
    cache = FeatureCache(train_dir)
    assert len(cache) == 4 * 3
    spec = B.spec_of(cfg)
    init = B.build(effnet.model, torch.zeros(1, 3, 224, 224), spec)
    with torch.no_grad():
        feats = init.model.head(torch.from_numpy(np.stack([x for _, x in iter_views(
            photos_data.split_files()[0], 3, IMAGENET_PREPROCESS, 0)])))
    B.pca_init(init.model.encoder, init.model.decoder, feats)
    trained = B.build(effnet.model, torch.zeros(1, 3, 224, 224), spec)
    B.load_trainable(trained.model, torch.load(out / B.WEIGHTS, weights_only=True))
    # the run keeps the epoch with the lowest validation loss; compare the last epoch's weights too
    last = B.build(effnet.model, torch.zeros(1, 3, 224, 224), spec)
    B.load_trainable(last.model, torch.load(out / "checkpoint.pt", weights_only=True)["state"])
    before = validate(Objective(init.model, [], (), spec.bits, TINY.rec_weight), cache)["loss"]
    after = validate(Objective(last.model, [], (), spec.bits, TINY.rec_weight), cache)["loss"]
    assert after < 0.95 * before
    assert hist["train_loss"][1] > hist["train_loss"][2] > hist["train_loss"][3]
    assert (out / "curves.png").stat().st_size > 10_000


def test_same_seed_same_weights_and_resume(tiny_run, effnet, photos_data, tmp_path, monkeypatch):
    """A second run with the same arguments gives bit-identical weights; so does a run interrupted after
    epoch 2 and started again (it resumes from checkpoint.pt)."""
    out, cfg = tiny_run
    spec = B.spec_of(cfg)
    again = train_bottleneck(effnet, spec, photos_data, TINY, tmp_path / "again", cache=out / "cache")
    assert again["weights"]["sha256"] == cfg["weights"]["sha256"]

    import toolkit.distill as D

    real_say = D.say

    def interrupt(msg):
        real_say(msg)
        if msg.startswith("epoch 2/"):
            raise KeyboardInterrupt

    monkeypatch.setattr(D, "say", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_bottleneck(effnet, spec, photos_data, TINY, tmp_path / "resumed", cache=out / "cache")
    monkeypatch.setattr(D, "say", real_say)
    resumed = train_bottleneck(effnet, spec, photos_data, TINY, tmp_path / "resumed", cache=out / "cache")
    assert resumed["weights"]["sha256"] == cfg["weights"]["sha256"]
    other = B.BottleneckSpec(**{**B.spec_of(cfg).__dict__, "bits": 3})
    with pytest.raises(B.BottleneckError, match="other arguments"):
        train_bottleneck(effnet, other, photos_data, TINY, tmp_path / "resumed", cache=out / "cache")


def test_warm_start_continues_from_a_trained_bottleneck(tiny_run, effnet, photos_data, tmp_path):
    """--init-from: epoch 0 of the new run is the trained bottleneck itself (same validation loss, same
    tensors when no epoch beats it), more epochs go on lowering the training loss, a 3-bit run may start
    from the 4-bit one, and another layout is refused with the differing field named."""
    from toolkit.bottleneck_train import warm_start_from

    out, cfg = tiny_run
    spec = B.spec_of(cfg)
    hist = cfg["training"]["history"]
    best = hist["val_loss"][cfg["training"]["best_epoch"]]
    zero = DistillConfig(**{**TINY.__dict__, "epochs": 0})
    same = train_bottleneck(effnet, spec, photos_data, zero, tmp_path / "w0", cache=out / "cache", init_from=out)
    assert same["training"]["init"]["from"] == str(out)
    assert same["training"]["history"]["val_loss"][0] == pytest.approx(best, rel=1e-5)
    assert same["weights"]["sha256"] == cfg["weights"]["sha256"]

    more = train_bottleneck(effnet, spec, photos_data, TINY, tmp_path / "w3", cache=out / "cache", init_from=out)
    h = more["training"]["history"]
    assert h["train_loss"][1] < hist["train_loss"][1]  # it does not start over from the PCA initialisation
    assert h["val_loss"][more["training"]["best_epoch"]] <= h["val_loss"][0]

    # a later target layer: the server side fine-tunes one more original layer, which starts as the original's
    later = B.BottleneckSpec(**{**spec.__dict__, "target": "blocks.6"})
    ext = train_bottleneck(effnet, later, photos_data, zero, tmp_path / "t6", cache=out / "cache6", init_from=out)
    assert ext["training"]["init"]["target"] == "blocks.5" and ext["target"] == "blocks.6"
    got = torch.load(tmp_path / "t6" / B.WEIGHTS, weights_only=True)
    saved = torch.load(out / B.WEIGHTS, weights_only=True)
    assert all(torch.equal(got[k], v) for k, v in saved.items())
    orig = dict(effnet.model.named_parameters())
    new = [k for k in got if k not in saved and k.endswith("weight")]
    assert new and all(torch.equal(got[k], orig[k[len("decoder.trunk."):]]) for k in new)
    with pytest.raises(B.BottleneckError, match="not in its decoder"):
        train_bottleneck(effnet, spec, photos_data, zero, tmp_path / "t5", cache=out / "cache", init_from=tmp_path / "t6")

    three = B.BottleneckSpec(**{**spec.__dict__, "bits": 3})
    state, desc = warm_start_from(out, effnet, three)
    assert desc["bits"] == 4 and set(state) == set(torch.load(out / B.WEIGHTS, weights_only=True))
    wider = B.BottleneckSpec(**{**spec.__dict__, "channels": 12})
    with pytest.raises(B.BottleneckError, match=r"channels 8 \(asked: 12\)"):
        train_bottleneck(effnet, wider, photos_data, TINY, tmp_path / "w12", cache=out / "cache", init_from=out)
    assert not (tmp_path / "w12").exists()  # refused before anything is written
    with pytest.raises(B.BottleneckError, match="is also -o"):
        train_bottleneck(effnet, spec, photos_data, TINY, out, cache=out / "cache", init_from=out)
    note = tmp_path / "notes.txt"
    note.write_text("not a photo")
    with pytest.raises(DataError, match="notes.txt: not an image file"):
        TrainData(["samples"], photos=[str(note)], val_every=5).split_files()


def test_code_entropy_estimate_follows_the_codes_and_its_gradient_concentrates_them():
    """The soft-binned estimate is within 0.1 bit of the rounded codes' histogram entropy, and descending it
    (what --rate-weight adds to the loss) moves values onto fewer levels: the hard entropy falls."""
    g = torch.Generator().manual_seed(0)
    logit = torch.randn(2, 8, 14, 14, generator=g).requires_grad_()
    z = torch.sigmoid(logit)
    hard = B.histogram_entropy_bits(np.bincount(torch.round(z * 15).long().ravel().numpy()))
    assert abs(float(B.code_entropy_bits(z.detach(), 4)) - hard) < 0.1 and hard > 3.0
    opt = torch.optim.SGD([logit], lr=2000.0)
    for _ in range(40):
        opt.zero_grad()
        B.code_entropy_bits(torch.sigmoid(logit), 4).backward()
        opt.step()
    after = B.histogram_entropy_bits(np.bincount(torch.round(torch.sigmoid(logit) * 15).long().ravel().numpy()))
    assert after < hard - 0.5
    assert B.histogram_entropy_bits([5, 0, 0]) == 0.0 and B.histogram_entropy_bits([1, 1, 1, 1]) == 2.0


def test_rate_weight_trains_for_fewer_bytes_on_the_wire(tiny_run, effnet, photos_data, tmp_path):
    """Two runs from the same trained bottleneck, with and without the rate term: the one that prices the
    code's entropy ends with lower validation code entropy and smaller real REQUEST frames (zstd) for the
    same views; the history records the entropy per epoch, and a run with the rate term never resumes a
    checkpoint of one without it."""
    from toolkit.bottleneck_eval import wire_round_trip

    out, cfg = tiny_run
    spec = B.spec_of(cfg)
    runs = {}
    for w in (0.0, 1.0):
        c = DistillConfig(**{**TINY.__dict__, "epochs": 3, "rate_weight": w})
        runs[w] = train_bottleneck(effnet, spec, photos_data, c, tmp_path / f"r{w}", cache=out / "cache",
                                   init_from=out)
    bits = {w: r["training"]["history"]["val_code_entropy"] for w, r in runs.items()}
    assert len(bits[1.0]) == 4 and bits[1.0][0] == pytest.approx(bits[0.0][0])  # same starting point
    assert bits[1.0][-1] < bits[0.0][-1] - 0.5
    views = torch.from_numpy(np.stack([x for _, x in iter_views(photos_data.split_files()[0], 1,
                                                                  IMAGENET_PREPROCESS, 0)]))
    frames = {}
    for w in runs:
        built, _ = B.load(tmp_path / f"r{w}", effnet.model, views[:1])
        with torch.no_grad():
            code = built.model.encoder(built.model.head(views)).numpy()
        frames[w] = np.mean([len(wire_round_trip(code[i:i + 1], spec.bits, "encoder")[0]) for i in range(len(code))])
    assert frames[1.0] < 0.9 * frames[0.0]
    with pytest.raises(B.BottleneckError, match="other arguments"):
        c = DistillConfig(**{**TINY.__dict__, "epochs": 3, "rate_weight": 1.0})
        train_bottleneck(effnet, spec, photos_data, c, tmp_path / "r0.0", cache=out / "cache", init_from=out)
    with pytest.raises(B.BottleneckError, match="add 'logits' to match"):
        train_bottleneck(effnet, spec, photos_data, DistillConfig(**{**TINY.__dict__, "kd_temperature": 2.0}),
                         tmp_path / "kd", cache=out / "cache", init_from=out)


def test_kd_temperature_matches_the_logits_by_kl_divergence(tiny_run, effnet):
    """With kd_temperature T the logits term is T^2 x KL(softmax(teacher / T) || softmax(student / T)), the
    batch mean, computed here by hand; without it the same logits enter as an MSE over their variance."""
    out, cfg = tiny_run
    spec = B.spec_of(cfg)
    x0 = torch.zeros(1, 3, 224, 224)
    built, _ = B.load(out, effnet.model, x0)
    cache = FeatureCache(next((out / "cache").glob("val-*")))
    parts = B.tail_parts(effnet.model, x0, spec.target, [])
    idx = np.arange(len(cache))
    base = Objective(built.model, parts, (), spec.bits, 0.0)
    kd = Objective(built.model, parts, ("logits",), spec.bits, 0.0, kd_temperature=2.0)
    mse = Objective(built.model, parts, ("logits",), spec.bits, 0.0)
    with torch.no_grad():
        o = kd.outputs(cache.get("inputs", idx), logits=True)
        term = float(kd.loss(o, cache, idx) - base.loss(o, cache, idx))
        s, t = o["logits"].double() / 2, cache.get("logits", idx).double() / 2
        want = 4 * float((torch.softmax(t, 1) * (torch.log_softmax(t, 1) - torch.log_softmax(s, 1))).sum(1).mean())
        as_mse = float(mse.loss(o, cache, idx) - base.loss(o, cache, idx))
    assert term == pytest.approx(want, rel=1e-3) and term > 0
    assert as_mse == pytest.approx(float(((o["logits"] - cache.get("logits", idx)) ** 2).mean()) / cache.variance("logits"),
                                   rel=1e-4)


def test_saved_weights_are_tensors_checked_by_sha256(tiny_run, effnet, tmp_path):
    out, cfg = tiny_run
    state = torch.load(out / B.WEIGHTS, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder"}
    assert (out / B.WEIGHTS).stat().st_size < 2_000_000
    saved = json.loads((out / B.CONFIG).read_text())
    assert saved["training"]["labels_used"] is False and saved["code_shape"] == [8, 14, 14]
    assert saved["device_mflops"] < saved["model_mflops"] / 4
    built, _ = B.load(out, effnet.model, torch.zeros(1, 3, 224, 224), "efficientnet-lite0")
    with torch.no_grad():
        assert torch.equal(built.model.encoder.conv.weight, state["encoder.conv.weight"])
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("cache", "checkpoint.pt"))
    data = bytearray((bad / B.WEIGHTS).read_bytes())
    data[-20] ^= 0xFF
    (bad / B.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(B.BottleneckError, match="sha256"):
        B.load(bad, effnet.model, torch.zeros(1, 3, 224, 224))
    with pytest.raises(B.BottleneckError, match="trained for model"):
        B.load(out, effnet.model, torch.zeros(1, 3, 224, 224), "resnet18")


def test_export_with_bottleneck_matches_pytorch_and_names_it(tiny_run, effnet, calib_images, verify_images, tmp_path):
    """Head + encoder on the device, decoder + tail on the server, float and int8, ONNX and TFLite; the float
    chains equal the PyTorch model with the bottleneck by value; the manifest says which bottleneck (sha256
    included)."""
    from runtime.bundle import Bundle
    from toolkit.bottleneck_export import with_bottleneck
    from toolkit.bottleneck_report import evaluate_target
    from toolkit.export import ExportOptions, export_bundle

    out, cfg = tiny_run
    with pytest.raises(B.BottleneckError, match="--split blocks.3"):
        with_bottleneck(effnet, out, ["blocks.5"])
    src, splits, section = with_bottleneck(effnet, out, ["blocks.3"])
    assert splits == ["encoder"] and src.model is not effnet.model
    bundle_dir = tmp_path / "bundle"
    report = export_bundle(src, ExportOptions(split=splits, out=bundle_dir, int8=True, progress=False,
                                              formats=("onnx", "tflite"), layer_profile_graph=False,
                                              bottleneck=section),
                           calib_images, verify_images)
    for pair in ("onnx/fp32", "tflite/fp32"):
        fp32 = report["verification"]["chains"][pair]["batch_n"]
        assert fp32["rel_diff"] < 1e-4 and fp32["top1_agreement"] == 1.0, pair
    b = Bundle.load(bundle_dir)
    m = b.manifest
    assert m.split == "encoder" and m.tensors["encoder"].shape == [None, 8, 14, 14]
    assert m.bottleneck.weights.sha256 == cfg["weights"]["sha256"]
    assert (m.bottleneck.channels, m.bottleneck.split, m.bottleneck.target, m.bottleneck.bits) == (8, "blocks.3",
                                                                                                   "blocks.5", 4)
    assert m.bottleneck.training.labels_used is False and m.bottleneck.training.data == ["samples"]
    device = m.device_segments
    assert len(device) == 1 and device[0].mflops == pytest.approx(cfg["device_mflops"], rel=1e-6)
    assert device[0].mflops < 770.4 / 4
    with torch.no_grad():  # the device graph's output is the encoder's: clamped to [0, 1]
        z = src.model.encoder(src.model.head(torch.from_numpy(verify_images.x[:2])))
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    result = evaluate_target(bundle_dir, "samples", None, None, None)
    runs = [r["run"] for r in result["rows"]]
    assert runs == [f"{f}/{p} device + {f}/{s} server" for f in ("onnx", "tflite")
                    for p, s in (("fp32", "fp32"), ("int8", "int8"), ("int8", "fp32"))]
    tfl = result["rows"][3]  # TFLite float chain: the same codes, the same predictions as ONNX's
    assert tfl["bytes_mean"] == pytest.approx(result["rows"][0]["bytes_mean"], rel=0.01)
    assert abs(tfl["agreement"] - result["rows"][0]["agreement"]) <= 1 / tfl["samples"] + 1e-9
    fp = result["rows"][0]
    assert fp["samples"] == len(image_files("samples")) and 300 < fp["bytes_mean"] < 28 + 300 + 8 * 196 * 4 // 8
    pt = evaluate_target(out, "samples", None, None, None)
    assert [r["run"] for r in pt["rows"]] == ["pytorch fp32, float code", "pytorch fp32, 4-bit code"]
    assert pt["rows"][1]["bytes_mean"] == pytest.approx(fp["bytes_mean"], rel=0.01)
    assert pt["rows"][1]["agreement"] == fp["agreement"]


def test_bottleneck_bundle_with_nbit_wire_in_rate(tiny_run, effnet, effnet_bundle, calib_images, verify_images,
                                                  imagenet_source, tmp_path):
    """export --bottleneck --wire-bits 4: the code goes on the wire as bit-packed 4-bit codes; `eetool rate`
    measures it (and other bit depths) against the images, scored by the original model's bundle, and refuses
    to score images with a bottleneck model."""
    from runtime.bundle import Bundle
    from toolkit.bottleneck_export import with_bottleneck
    from toolkit.calibrate import WireCodec
    from toolkit.export import ExportOptions, export_bundle
    from toolkit.rate import run_rate

    out, _ = tiny_run
    src, splits, section = with_bottleneck(effnet, out, ["blocks.3"])
    bdir = tmp_path / "bn-4bit"
    export_bundle(src, ExportOptions(split=splits, out=bdir, progress=False, layer_profile_graph=False,
                                     bottleneck=section, wire=WireCodec(4, False, "minmax")), calib_images, verify_images)
    q = Bundle.load(bdir).manifest.tensors["encoder"].quant
    assert (q.dtype, q.bits, q.axis) == ("uint8", 4, None)
    # the code is clamped to [0, 1] and reaches both ends: minmax gives the 4-bit grid the decoder was trained on
    assert q.zero_point == 0 and q.scale == pytest.approx(1 / 15, rel=1e-3)
    with pytest.raises(ValueError, match="original model"):
        run_rate([str(bdir)], imagenet_source, jpeg=[], webp=[], limit=4)
    plain = str(effnet_bundle[0])
    report = run_rate([str(bdir), plain], imagenet_source, jpeg=[50], webp=[], wire=[WireCodec(2, False, "minmax")],
                      limit=4)
    assert report["float"]["graphs"].startswith(effnet_bundle[0].name)
    rows = {p["info"]["bits"]: p for p in report["points"] if p["kind"] == "split" and p["info"]["bundle"] == str(bdir)}
    assert sorted(rows) == [2, 4] and all(r["samples"] == 4 for r in rows.values())
    assert rows[4]["payload_mean"] <= 8 * 196 * 4 // 8 < rows[4]["bytes_mean"]
    assert rows[2]["payload_mean"] < rows[4]["payload_mean"]
    alone = run_rate([plain], imagenet_source, jpeg=[50], webp=[], limit=4)
    assert alone["float"]["top1"] == report["float"]["top1"]


def test_plan_with_bottleneck_plans_the_encoder_cut(tiny_run, imagenet_source):
    """eetool plan --bottleneck: one split option, the encoder output, with the device side's MFLOPs and the
    n-bit code's real frame bytes (8 x 14 x 14 values at 4 bits, bit-packed: at most 392 B of payload)."""
    from click.testing import CliRunner

    from toolkit.cli_plan import plan

    out, cfg = tiny_run
    res = CliRunner().invoke(plan, ["efficientnet-lite0", "--bottleneck", str(out), "--board", "rpi4", "--server-profile",
                                    "rpi5", "--wire-bits", "4", "--wire-range", "minmax", "--samples", "2", "--data",
                                    imagenet_source, "--bandwidth", "1,100mbit", "--no-plot", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    split = [o for o in report["options"] if o["kind"] == "split"]
    assert [o["name"] for o in split] == ["encoder"]
    assert split[0]["info"]["head_mflops"] == pytest.approx(cfg["device_mflops"], rel=1e-3)
    assert 28 < split[0]["request_bytes"] < 28 + 1000 + 8 * 196 * 4 // 8
    refused = CliRunner().invoke(plan, ["efficientnet-lite0", "--bottleneck", str(out), "--candidates", "blocks.5"])
    assert refused.exit_code == 2 and "--candidates: --bottleneck plans its own cut" in refused.output
