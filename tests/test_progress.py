"""runtime.progress: a bar on a terminal, one line per stage on a file or pipe; and the training loop that
writes the most progress (make reference) goes through it."""
import io
import sys

import torch

from runtime.progress import is_terminal, progress


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_non_terminal_gets_one_line_per_stage_and_no_carriage_returns():
    out = io.StringIO()
    for stage in ("read", "calibrate", "verify"):
        it = progress(range(1000), stage, "item", stream=out)
        for i in it:
            if i == 999:
                it.set_postfix(loss="0.25")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines] == ["read", "calibrate", "verify"]
    assert all(" 1000 item in " in line and line.endswith("loss=0.25") for line in lines)


def test_loop_left_early_still_writes_its_line_with_the_count():
    out = io.StringIO()
    for i in progress(range(10), "search", stream=out):
        if i == 3:
            break
    assert out.getvalue().startswith("search: 3 it in ")


def test_terminal_gets_a_bar_and_disabled_writes_nothing():
    tty = Tty()
    assert is_terminal(tty) and not is_terminal(io.StringIO())
    assert list(progress(range(50), "bar", stream=tty)) == list(range(50))
    assert "\r" in tty.getvalue()  # tqdm redraws in place
    quiet = io.StringIO()
    assert list(progress(range(5), "off", enabled=False, stream=quiet)) == list(range(5))
    assert quiet.getvalue() == ""


def test_training_log_to_a_file_is_one_line_per_epoch(monkeypatch):
    from toolkit.train_reference import Batches, train_backbone

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    train_backbone(model, Batches(x, y, 8, seed=0), epochs=3, lr=1e-3, progress=True)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(":")[0] for line in lines] == ["backbone epoch %d/3" % e for e in (1, 2, 3)]
    assert all(" 8 batch in " in line and "loss=" in line for line in lines)


def test_reading_images_logs_one_line(monkeypatch):
    from calibration.readers import read_dataset
    from toolkit.sources import IMAGENET_PREPROCESS

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    from calibration.readers import skimage_photo_paths

    folder = skimage_photo_paths()[0].parent
    ds = read_dataset(str(folder), IMAGENET_PREPROCESS, limit=3, progress=True)
    assert log.getvalue().startswith("reading images: %d img in " % len(ds)) and log.getvalue().count("\n") == 1
