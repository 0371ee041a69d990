"""Ground-truth class labels for input files, so a report can state top-1 accuracy, not only agreement.

Where a label comes from, first match wins, per file:

1. the bundle manifest's ``samples.labels`` (``{"file name": class index}``), written by ``eetool export``
   for the ``samples/`` it copies when its data had labels;
2. ``synsets.txt`` in the file's folder (``<index>\\t<wnid>\\t<name>`` lines; ImageNet-style file names
   ``<wnid>_<anything>``);
3. ``labels.txt`` in the file's folder (``<file name>\\t<class index>`` lines).

Class indices are ints (the model's output index). Python 3.8 compatible; numpy-free.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence


class LabelError(ValueError):
    """A label file that cannot be used; the message names the file and the fix."""


def _read(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError("cannot read %s as UTF-8 text: %s" % (path, e))


def synset_index(path) -> Dict[str, int]:
    """``{wnid: class index}`` from a ``synsets.txt`` (``<index>\\t<wnid>[\\t<name>]`` lines)."""
    out: Dict[str, int] = {}
    for line in _read(path).splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].strip().isdigit():
            out[parts[1].strip()] = int(parts[0])
    return out


def labels_table(path) -> Dict[str, int]:
    """``{file name: class index}`` from a ``labels.txt`` (``<file name>\\t<index>`` lines). Raises
    LabelError on a line whose index is not an integer."""
    out: Dict[str, int] = {}
    for n, line in enumerate(_read(path).splitlines(), 1):
        if "\t" not in line:
            continue
        name, value = line.split("\t")[:2]
        try:
            out[name] = int(value)
        except ValueError:
            raise LabelError("%s line %d: class index %r is not an integer" % (path, n, value))
    return out


def folder_label(path: Path, cache: Dict[Path, tuple]) -> Optional[int]:
    """The label of one file from its folder's ``synsets.txt`` or ``labels.txt`` (None when neither has
    it). ``cache`` keeps each folder's parsed tables between calls."""
    folder = path.parent
    if folder not in cache:
        syn, tab = folder / "synsets.txt", folder / "labels.txt"
        cache[folder] = (synset_index(syn) if syn.is_file() else None, labels_table(tab) if tab.is_file() else None)
    synsets, table = cache[folder]
    if synsets is not None:
        return synsets.get(path.name.split("_", 1)[0])
    if table is not None:
        return table.get(path.name)
    return None


def labels_for(files: Sequence, sample_labels: Optional[Dict[str, int]] = None, samples_dir=None,
               explain: bool = False):
    """Class index per file (see module doc), or None when any file has no label (accuracy then needs a
    labelled input set: an ImageNet-style folder with ``synsets.txt``, or a ``labels.txt``).
    ``sample_labels`` (the manifest's ``samples.labels``, file name -> class) apply to files in
    ``samples_dir`` (the bundle's ``samples/``). With ``explain=True`` returns ``(labels or None, why
    not)``. Raises LabelError for an unreadable label file."""
    known = dict(sample_labels or {})
    samples = Path(samples_dir).resolve() if samples_dir else None
    cache: Dict[Path, tuple] = {}
    out: List[int] = []
    for f in files:
        p = Path(f)
        if samples is not None and p.name in known and p.resolve().parent == samples:
            label = known[p.name]
        else:
            label = folder_label(p, cache)
        if label is None:
            synsets, table = cache.get(p.parent, (None, None))
            if synsets is not None:
                why = "%s: its wnid prefix is not in synsets.txt there" % p
            elif table is not None:
                why = "%s has no line in labels.txt there (lines: <file name><TAB><class index>)" % p
            else:
                why = "%s has no label (no synsets.txt or labels.txt beside it, none in the manifest)" % p
            return (None, why) if explain else None
        out.append(int(label))
    return (out, "") if explain else out
