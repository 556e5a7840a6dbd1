"""Progress when output is not a terminal (issue 18): ``itrkit train > log 2>&1`` shows what is
being computed and where it is cached, then steady progress lines (done/total, rate, ETA) during
feature caching and training, and never tqdm's carriage-return frames."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from itrkit.utils import progress as P

LINE = re.compile(r"^\[itrkit\] (?P<desc>.+?): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\S+) \((?P<pct>\d+)%\), "
                  r"(?P<rate>[\d.e+]+|\?) \S+/s, (elapsed [\d:]+(, ETA (?P<eta>[\d:?]+))?|(?P<done>done) in [\d:]+)")


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_come_at_a_steady_pace_with_true_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(P.time, "monotonic", clock)
    monkeypatch.setenv("ITRKIT_PROGRESS_SECONDS", "10")
    monkeypatch.setenv("ITRKIT_PROGRESS", "auto")
    out = io.StringIO()  # not a terminal
    bar = P.progress(total=1600, desc="image features", unit="img", what="computing image features with tower t",
                     cached_at="/c/x.safetensors", stream=out)
    for _ in range(1600):  # 16 items/s for 100 s: an update every 1/16 s (exact in binary)
        clock.t += 0.0625
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == ("[itrkit] image features: computing image features with tower t (1600 img); "
                        "cached at /c/x.safetensors")
    ticks = [LINE.match(s) for s in lines[1:-1]]
    assert all(ticks), lines
    # One line per 10 s of work, not one per update (1600 updates): 9 in 100 s + the closing tally.
    assert len(ticks) == 9
    for k, m in enumerate(ticks, start=1):
        assert (int(m["n"]), int(m["total"]), m["unit"], m["pct"]) == (160 * k, 1600, "img", str(10 * k))
        assert float(m["rate"]) == 16.0
        assert m["eta"] == f"{(100 - 10 * k) // 60}:{(100 - 10 * k) % 60:02d}"
    assert lines[-1] == "[itrkit] image features: 1600/1600 img (100%), 16 img/s, done in 1:40"
    assert "\r" not in out.getvalue()


def test_skipped_items_count_as_done_but_not_in_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(P.time, "monotonic", clock)
    monkeypatch.setenv("ITRKIT_PROGRESS_SECONDS", "0")
    out = io.StringIO()
    bar = P.progress(total=100, desc="d", unit="it", stream=out)
    bar.skip(60)  # kept from an interrupted run
    clock.t += 4.0
    bar.update(20)
    m = LINE.match(out.getvalue().splitlines()[0])
    assert m and m["n"] == "80" and float(m["rate"]) == 5.0 and m["eta"] == "0:04"


def test_short_work_stays_quiet_and_off_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITRKIT_PROGRESS_SECONDS", "10")
    out = io.StringIO()
    assert list(P.progress(range(50), desc="x", what="computing x", cached_at="/c", stream=out)) == list(range(50))
    assert out.getvalue() == ""  # done in under 10 s: no line at all, not even the announcement
    monkeypatch.setenv("ITRKIT_PROGRESS_SECONDS", "0")
    for _ in P.progress(range(5), desc="x", what="w", stream=out, enabled=False):
        pass
    assert out.getvalue() == ""


def test_itrkit_train_redirected_to_a_file_shows_caching_then_training_progress(tmp_path: Path, synth_dir: Path) -> None:
    log = tmp_path / "train.out"
    cache = tmp_path / "cache"
    env = {**os.environ, "ITRKIT_PROGRESS_SECONDS": "0", "ITRKIT_CACHE": str(cache), "ITRKIT_PROGRESS": "auto"}
    cmd = [sys.executable, "-m", "itrkit", "train", "--data", str(synth_dir), "--out", str(tmp_path / "run"),
           "--set", "model.image_tower=tiny-image", "--set", "model.text_tower=tiny-text",
           "--set", "model.embed_dim=32", "--set", "batch_size=16", "--set", "stages.0.epochs=2",
           "--set", "device=cpu"]
    with open(log, "w", encoding="utf-8") as f:  # stdout and stderr to a file: no terminal
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_bytes().decode("utf-8")  # bytes: read_text would turn "\r" into "\n"
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text, "tqdm carriage-return frames in the log"
    lines = text.splitlines()

    # Feature caching: first a line naming the tower and the cache entry (which then exists).
    first = next(i for i, s in enumerate(lines) if "computing image features" in s)
    m = re.search(r"with the tiny-image tower \((\d+) image\); cached at (\S+\.safetensors)$", lines[first])
    assert m, lines[first]
    assert Path(m[2]).is_file() and Path(m[2]).parent == cache / "features"
    first_txt = next(i for i, s in enumerate(lines) if "computing text features" in s)
    n_captions = int(re.search(r"tower \((\d+) text\)", lines[first_txt])[1])
    # The 126 training captions go through the text tower in batches of 64: a line after the first
    # batch (during caching, not only at its end), then the closing tally.
    txt = [LINE.match(s) for s in lines[first_txt + 1:first_txt + 3]]
    assert all(txt) and [(int(t["n"]), int(t["total"]), t["done"]) for t in txt] == \
        [(64, n_captions, None), (n_captions, n_captions, "done")]

    # Training: per-epoch lines with batches done / total, after the caching lines.
    train_ticks = [(i, LINE.match(s)) for i, s in enumerate(lines) if s.startswith("[itrkit] main epoch ")]
    train_ticks = [(i, t) for i, t in train_ticks if t]
    assert train_ticks, text[-2000:]
    assert min(i for i, _ in train_ticks) > first
    n_batches = -(-n_captions // 16)  # an epoch is one pass over the training captions
    assert {t["desc"] for _, t in train_ticks} == {"main epoch 1/2", "main epoch 2/2"}
    assert all(int(t["total"]) == n_batches for _, t in train_ticks)
    assert any("loss=" in lines[i] for i, _ in train_ticks)
