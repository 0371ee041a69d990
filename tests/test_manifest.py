"""The bundle manifest schema (runtime/manifest.py): validation that names the field, round trips, schema
versions and migration. Needs no torch: runs under the Python 3.8 runtime venv too."""
import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

from runtime.bundle import Bundle, BundleError
from runtime.manifest import (SCHEMA, SCHEMA_VERSION, WRITTEN_SINCE, ExitBranch, Manifest, ManifestError,
                              WireQuant, doc_with_fields, load_manifest, manifest_json, parse_manifest)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _manifest() -> dict:
    """A small but complete manifest: device segment with an exit, server segment, int8 wire tensor."""
    io = lambda name, shape: {"name": name, "shape": shape, "dtype": "float32", "layout": "NCHW"}  # noqa: E731
    return {
        "schema": SCHEMA, "created_by": "eetool 0.2.0",
        "model": {"source": "fashion-cnn", "kind": "zoo"},
        "input": io("input", [None, 1, 28, 28]),
        "output": {"name": "logits", "shape": [None, 10], "dtype": "float32"},
        "preprocess": {"kind": "array", "scale": 1 / 255, "mean": [0.286], "std": [0.353], "layout": "NCHW"},
        "cuts": ["stage2"], "split": "stage2",
        "calibration": {"source": "fashion-mnist:train", "samples": 2, "names": ["train[0]", "train[1]"]},
        "segments": [
            {"name": "seg0", "side": "device", "after": None, "until": "stage2", "inputs": ["input"],
             "outputs": ["stage2"], "mflops": 1.5, "params": 100, "graphs": {"onnx/fp32": "seg0.onnx.fp32"}},
            {"name": "seg1", "side": "server", "after": "stage2", "until": None, "inputs": ["stage2"],
             "outputs": ["logits"], "mflops": 0.5, "params": 50, "graphs": {"onnx/fp32": "seg1.onnx.fp32"}},
        ],
        "exits": [{"name": "exit0", "at": "stage2", "input": "stage2", "output": "exit0.logits", "mflops": 0.1,
                   "rule": "max_softmax", "threshold": 0.9, "thresholds": {"onnx/fp32": 0.9},
                   "expected_exit_rate": {"onnx/fp32": 0.4}, "graphs": {"onnx/fp32": "exit0.onnx.fp32"}}],
        "tensors": {"stage2": {"shape": [None, 32, 7, 7], "dtype": "float32", "layout": "NCHW",
                               "quant": {"dtype": "int8", "scale": 0.02, "zero_point": -128,
                                         "scheme": "per-tensor affine", "range": "minmax", "samples": 2}}},
        "graphs": {k: {"file": "graphs/%s.fp32.onnx" % k.split(".")[0], "format": "onnx", "precision": "fp32",
                       "inputs": [io(i, None)], "outputs": [io(o, None)], "quantization": None}
                   for k, i, o in [("seg0.onnx.fp32", "input", "stage2"), ("seg1.onnx.fp32", "stage2", "logits"),
                                   ("exit0.onnx.fp32", "stage2", "exit0.logits")]},
        "samples": {"labels": {"sample0_label3.png": 3}},
        "layer_profile_graph": {"file": "profile/model.fp32.onnx", "input": "input", "output": "logits",
                                "dtype": "float32", "layout": "NCHW"},
        "extensions": {"other-tool": {"note": [1, 2]}},
        "files": {"graphs/seg0.fp32.onnx": "0" * 64},
    }


def _error(data) -> ManifestError:
    with pytest.raises(ManifestError) as err:
        parse_manifest(data)
    return err.value


def test_round_trip_dataclass_json_dataclass():
    m = parse_manifest(_manifest())
    assert isinstance(m.exits[0], ExitBranch) and isinstance(m.tensors["stage2"].quant, WireQuant)
    text = manifest_json(m)
    back = parse_manifest(json.loads(text))
    assert back == m
    assert json.loads(text) == m.to_json()
    assert back.extensions == {"other-tool": {"note": [1, 2]}}  # kept as it is, never interpreted
    # attribute views
    assert [s.name for s in back.device_segments] == ["seg0"] and back.wire_tensors == ["stage2"]
    assert back.exits[0].threshold_for("onnx/fp32") == 0.9 and back.exits[0].threshold_for("onnx/int8") == 0.9
    assert back.exits[0].exit_rate_for("tflite/int8") == 0.4
    assert back.num_classes == 10 and back.formats() == ["onnx/fp32"]
    assert back.tensors["stage2"].quant.params().qmin == -128


def test_built_in_code_and_validated_on_write():
    m = parse_manifest(_manifest())
    m.segments[1].side = "edge"  # a writer's mistake is caught before anything is written
    with pytest.raises(ManifestError, match=r"manifest\.segments\[1\]\.side: 'edge' is not one of device, server"):
        manifest_json(m)


@pytest.mark.parametrize("edit,path,words", [
    (lambda d: d["segments"][0].update(colour="red"), "manifest.segments[0].colour", "unknown field"),
    (lambda d: d.update(gpu_kernels={}), "manifest.gpu_kernels", "extensions"),
    (lambda d: d.update(bottleneck={}), "manifest.bottleneck.split", "missing (required)"),
    (lambda d: d["exits"][0].update(threshold="high"), "manifest.exits[0].threshold", "expected number"),
    (lambda d: d["exits"][0].update(threshold=1.5), "manifest.exits[0].threshold", "outside [0, 1]"),
    (lambda d: d["exits"][0].update(rule="margin"), "manifest.exits[0].rule", "max_softmax"),
    (lambda d: d["tensors"]["stage2"]["quant"].update(zero_point=300), "manifest.tensors['stage2'].quant",
     "outside the int8 range"),
    (lambda d: d["tensors"]["stage2"]["quant"].update(scale=[0.1, 0.2], zero_point=[0, 0], axis=1),
     "manifest.tensors['stage2'].quant.bits", "n-bit codes"),
    (lambda d: d["tensors"]["stage2"]["quant"].update(bits=4, zero_point=0),
     "manifest.tensors['stage2'].quant.dtype", "uint8"),
    (lambda d: d["tensors"]["stage2"].update(codec="gzip"), "manifest.tensors['stage2'].codec", "brotli"),
    (lambda d: d["segments"][0]["graphs"].update({"onnx/int8": "seg0.onnx.int8"}),
     "manifest.segments[0].graphs['onnx/int8']", "not in `graphs`"),
    (lambda d: d["segments"][0]["graphs"].update({"onnx/int4": "seg0.onnx.fp32"}),
     "manifest.segments[0].graphs['onnx/int4']", "<format>/<precision>"),
    (lambda d: d["exits"][0].update(input="stage9"), "manifest.exits[0].input", "not produced by a device segment"),
    (lambda d: d.pop("split"), "manifest.split", "missing (required)"),
    (lambda d: d["graphs"]["seg0.onnx.fp32"].update(format="tensorrt"), "manifest.graphs['seg0.onnx.fp32'].format",
     "onnx, tflite"),
    (lambda d: d["tensors"].clear(), "manifest.tensors", "wire tensor 'stage2'"),
    (lambda d: d["segments"].reverse(), "manifest.segments", "device segments must come before"),
])
def test_bad_field_is_refused_naming_it(edit, path, words):
    d = _manifest()
    edit(d)
    e = _error(d)
    assert e.path == path, str(e)
    assert str(e).startswith(path + ": ") and words in str(e)


def test_old_schema_is_migrated_on_load(tmp_path):
    """A manifest written by eetool 0.1.0 (schema 1): no `extensions`, and from an .onnx model its wire
    tensors carried no quantisation."""
    d = _manifest()
    d["schema"] = "eetool.bundle/1"
    d["created_by"] = "eetool 0.1.0"
    del d["extensions"]
    del d["tensors"]["stage2"]["quant"]
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    m = load_manifest(tmp_path)
    assert m.migrated_from == 1 and m.schema == SCHEMA and m.tensors["stage2"].quant is None
    assert m.extensions == {} and m.exits[0].threshold == 0.9
    assert parse_manifest(_manifest()).migrated_from is None


@pytest.mark.parametrize("schema,words", [
    ("eetool.bundle/0", "re-export with eetool >= %s" % WRITTEN_SINCE[SCHEMA_VERSION]),
    (None, "re-export with eetool >= %s" % WRITTEN_SINCE[SCHEMA_VERSION]),
    ("onnx-model/1", "re-export with eetool >= %s" % WRITTEN_SINCE[SCHEMA_VERSION]),
    ("eetool.bundle/%d" % (SCHEMA_VERSION + 1), "newer than this runtime reads"),
])
def test_unreadable_schema_versions_are_refused(schema, words):
    d = _manifest()
    if schema is None:
        del d["schema"]
    else:
        d["schema"] = schema
    e = _error(d)
    assert e.path == "manifest.schema" and words in str(e)


def test_a_bundles_own_runtime_does_not_send_the_user_to_itself(tmp_path):
    """The runtime/ copied into bundle A that reads A's newer manifest advises replacing it (or a
    re-export), not running itself; reading another bundle B it sends the user to B's runtime/."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    newer = {"schema": "eetool.bundle/%d" % (SCHEMA_VERSION + 1), "created_by": "eetool 9.0"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(newer))
    shutil.copytree(root / "runtime", tmp_path / "a" / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys\nfrom runtime.manifest import load_manifest, ManifestError\n"
            "try:\n    load_manifest(sys.argv[1])\nexcept ManifestError as e:\n    print(e)")

    def advice(bundle):
        return subprocess.run([sys.executable, "-c", code, str(bundle)], cwd=tmp_path / "a", capture_output=True,
                              text=True, check=True).stdout

    own, other = advice(tmp_path / "a"), advice(tmp_path / "b")
    assert "newer than this runtime reads" in own and "eetool 9.0" in own
    assert "replace this bundle's runtime/" in own and "copied inside that bundle" not in own
    assert "run the runtime/ copied inside that bundle" in other
    e = _error({**_manifest(), **newer})  # the toolkit's runtime, no folder known
    assert "run the runtime/ copied inside that bundle" in str(e)


def test_every_field_is_documented():
    todo = [Manifest]
    seen = set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        assert (cls.__doc__ or "").strip(), cls
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), "%s.%s has no description" % (cls.__name__, f.name)
            hint = str(f.type)
            todo += [c for c in _all_nodes() if c.__name__ in hint]
    assert len(seen) >= 15


def _all_nodes():
    import runtime.manifest as M

    return [v for v in vars(M).values() if isinstance(v, type) and dataclasses.is_dataclass(v)]


def test_parse_does_not_mutate_its_input():
    d = _manifest()
    d["schema"] = "eetool.bundle/1"
    before = copy.deepcopy(d)
    parse_manifest(d)
    assert d == before


def test_bundle_load_names_the_bad_field(tmp_path):
    d = _manifest()
    d["exits"][0]["rule"] = "margin"
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"manifest\.json: manifest\.exits\[0\]\.rule: 'margin' is not one of"):
        Bundle.load(tmp_path, verify=False)
    d["exits"][0]["rule"] = "max_softmax"
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    b = Bundle.load(tmp_path, verify=False)
    assert b.exits[0].rule == "max_softmax" and b.tensor("stage2").quant.zero_point == -128
    with pytest.raises(BundleError, match="not in the manifest's tensors"):
        b.tensor("logits")


def test_bundle_md_is_generated_from_the_schema():
    path = os.path.join(REPO, "docs", "bundle.md")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert doc_with_fields(text) == text, "docs/bundle.md is stale: python -m runtime.manifest --write-doc docs/bundle.md"
    for field in ("calibration", "threshold", "thresholds", "expected_exit_rate", "name_map", "batch", "tflite_name",
                  "layer_profile_graph", "samples", "extensions", "exit_calibration"):
        assert "| `%s` |" % field in text, field
