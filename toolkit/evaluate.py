"""``eetool eval``: top-1 accuracy of every chain of a bundle (each format x precision) and of each exit
on labelled real data, plus agreement of every int8 chain with the float chain of its format, and of every
other float chain with the float ONNX chain."""
from __future__ import annotations

import numpy as np

from calibration.readers import Dataset
from runtime.bundle import Bundle
from runtime.chain import Chain


def evaluate_bundle(bundle: Bundle, data: Dataset, batch: int = 16, pairs: list[str] | None = None) -> dict:
    """Run every chain in ``pairs`` (default: all the bundle has) over ``data`` (float32 NCHW).

    Returns ``{"samples", "labelled", "chains": {pair: {"top1", "agreement_with_fp32", "agreement_reference",
    "exits": {...}}}}``: top-1 agreement of an int8 chain with the fp32 chain of its format, of an fp32
    chain (and of an int8 chain whose format has none) with onnx/fp32; ``agreement_reference`` names it.
    ``top1`` is present only when ``data`` has labels."""
    from runtime.progress import progress

    result: dict = {"samples": len(data), "labelled": data.y is not None, "source": data.source, "chains": {}}
    references: dict = {}  # format -> predictions of its fp32 chain
    order = list(pairs or bundle.formats())
    # fp32 chains first: each is the reference of the chains of its format
    for pair in sorted(order, key=lambda p: (p.split("/")[1] != "fp32", p.split("/")[0] != "onnx")):
        fmt, precision = pair.split("/")
        chain = Chain(bundle, "all", fmt, precision)
        finals, exits = [], {}
        for i in progress(range(0, len(data), batch), f"eval {pair}", "batch"):
            values = chain.run_segments({bundle.manifest.input.name: data.x[i:i + batch]})
            finals.append(values[bundle.manifest.output.name])
            for name, logits in chain.run_exits(values).items():
                exits.setdefault(name, []).append(logits)
        pred = np.concatenate(finals).argmax(1)
        entry: dict = {}
        if data.y is not None:
            entry["top1"] = float((pred == data.y).mean())
        if precision == "fp32":
            references[fmt] = pred
        ref_fmt = fmt if fmt in references and precision != "fp32" else "onnx"
        if ref_fmt in references:
            entry["agreement_with_fp32"] = float((pred == references[ref_fmt]).mean())
            entry["agreement_reference"] = f"{ref_fmt}/fp32"
        if exits:
            entry["exits"] = {}
            for name, parts in exits.items():
                p = np.concatenate(parts).argmax(1)
                entry["exits"][name] = {"agreement_with_final": float((p == pred).mean())}
                if data.y is not None:
                    entry["exits"][name]["top1"] = float((p == data.y).mean())
        if bundle.exits and data.y is not None:
            from .exits_bundle import measure_early_exit, simulate_early_exit

            entry["early_exit"] = measure_early_exit(bundle, data, fmt, precision)
            entry["early_exit"]["offline_simulation"] = simulate_early_exit(bundle, data, fmt, precision)
            calibrated = bundle.manifest.exit_calibration
            predicted = calibrated.results.get(pair) if calibrated else None
            if predicted:
                entry["early_exit"]["predicted_at_calibration"] = {
                    "accuracy": predicted.accuracy, "mflops_per_sample": predicted.expected_mflops,
                    "exit_rates": dict(zip([e.name for e in bundle.exits] + ["final"], predicted.exit_rates))}
        result["chains"][pair] = entry
    result["chains"] = {p: result["chains"][p] for p in order}
    return result
