"""Each export loads with the library people serve it with, and gives itrkit's embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from itrkit.data.images import preprocess
from itrkit.export import ExportError, export_run
from itrkit.models.io import load_model

from .conftest import CAPTIONS, images


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def test_sentence_transformers_export_encodes_like_itrkit_with_the_mlp_trunk(minilm_mlp_run, tmp_path) -> None:
    from sentence_transformers import SentenceTransformer

    run, model = minilm_mlp_run
    out = export_run(run, "sentence-transformers", tmp_path / "st")
    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    got = st.encode(CAPTIONS, convert_to_numpy=True, batch_size=2)
    ref = model.encode_texts(CAPTIONS)
    assert got.shape == (len(CAPTIONS), 32)
    assert _cos(got, ref).min() >= 0.9999
    assert np.abs(got - ref).max() < 1e-4
    # A stage dropped would not match: the bare MiniLM sentence embedding is 384-d, the trunk is not the identity.
    types = [m["type"] for m in json.loads((out / "modules.json").read_text())]
    assert types == ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                     "sentence_transformers.models.Normalize", "itrkit_st_modules.ItrkitResidualMLP",
                     "sentence_transformers.models.LayerNorm", "sentence_transformers.models.Dense",
                     "sentence_transformers.models.Normalize"]
    assert json.loads((out / "sentence_bert_config.json").read_text()) == {"max_seq_length": 256, "do_lower_case": False}
    assert (out / "itrkit_st_modules.py").is_file() and "## Metrics" in (out / "README.md").read_text()


def test_sentence_transformers_usa_head_without_trunk_loads_with_builtin_modules_only(tmp_path) -> None:
    from sentence_transformers import SentenceTransformer

    from itrkit.models.dual_encoder import ModelConfig, build_model

    from .conftest import randomise_heads, save_run

    model = randomise_heads(build_model(ModelConfig(image_tower="tiny-image", text_tower="minilm", embed_dim=16,
                                                    trunk="none", usa_heads=True, usa_dim=12)), seed=5).eval()
    run = save_run(model, tmp_path / "run")
    out = export_run(run, "sentence-transformers", tmp_path / "st-usa", head="usa")
    types = [m["type"] for m in json.loads((out / "modules.json").read_text())]
    assert all(t.startswith("sentence_transformers.") for t in types) and not (out / "itrkit_st_modules.py").exists()
    st = SentenceTransformer(str(out), device="cpu")  # no trust_remote_code needed
    got = st.encode(CAPTIONS, convert_to_numpy=True)
    ref = model.encode_texts_uni(CAPTIONS)
    assert got.shape == (len(CAPTIONS), 12) and _cos(got, ref).min() >= 0.9999
    assert np.abs(got - model.encode_texts(CAPTIONS)[:, :12]).max() > 0.1  # the USA head, not the cross head


def test_onnx_graphs_match_torch_on_raw_images_and_captions(minilm_mlp_run, tmp_path) -> None:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    run, model = minilm_mlp_run
    out = export_run(run, "onnx", tmp_path / "onnx")
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["image"] == {"size": 224, "mean": [127.0] * 3, "std": [128.0] * 3, "scale": "byte", "resize": "shorter",
                            "crop": "center", "resample": "bicubic", "layout": "NCHW", "dtype": "float32"}
    # Images: preprocessed from preprocess.json alone, run by onnxruntime, vs itrkit's encode_images.
    imgs = images(3)
    p = pre["image"]
    pixels = np.stack([preprocess(im, p["size"], p["mean"], p["std"], scale=p["scale"], resize=p["resize"])
                       for im in imgs])
    sess = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": pixels})[0]
    ref = model.encode_images(imgs)
    assert got.shape == (3, 32) and np.abs(got - ref).max() < 1e-4
    # Texts: the tokenizer saved beside the graph, dynamic batch and sequence length.
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    t = pre["text"]
    enc = tok([c.strip().lower() if t["lowercase"] else c.strip() for c in CAPTIONS], padding=True, truncation=True,
              max_length=t["max_length"], return_tensors="np")
    sess = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                          "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
    assert enc["input_ids"].shape[1] > 8  # a longer sequence than the one traced at export
    assert np.abs(got - model.encode_texts(CAPTIONS)).max() < 1e-4


def test_hf_export_of_a_clip_run_is_a_clipmodel_with_itrkits_embeddings(clip_run, tmp_path) -> None:
    from transformers import AutoModel, AutoTokenizer, CLIPImageProcessor, CLIPModel

    run, model = clip_run
    out = export_run(run, "hf", tmp_path / "hf-clip")
    clip = AutoModel.from_pretrained(str(out), trust_remote_code=True, local_files_only=True).eval()
    assert isinstance(clip, CLIPModel)
    imgs = images(4)
    with torch.no_grad():
        pixels = model.image_tower.prepare(imgs)
        got_img = torch.nn.functional.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        tok = AutoTokenizer.from_pretrained(str(out))
        enc = tok(["a dog", "the cat", "do cat the dog at"], padding=True, truncation=True, return_tensors="pt")
        got_txt = torch.nn.functional.normalize(clip.get_text_features(**enc).pooler_output, dim=-1)
        logits = clip(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      pixel_values=pixels).logits_per_image
    ref_img = model.encode_images(imgs)
    ref_txt = model.encode_texts(["a dog", "the cat", "do cat the dog at"])
    assert np.abs(got_img.numpy() - ref_img).max() < 1e-5
    assert np.abs(got_txt.numpy() - ref_txt).max() < 1e-5
    # CLIPModel.forward's logits are the run's scores at its temperature (1/τ = 20).
    assert np.allclose(logits.numpy(), 20.0 * ref_img @ ref_txt.T, atol=1e-3)
    # The folder's own image processor gives the same inputs as itrkit's preprocessing.
    proc = CLIPImageProcessor.from_pretrained(str(out))
    with torch.no_grad():
        via_proc = clip.get_image_features(**proc(images=imgs, return_tensors="pt")).pooler_output
    assert _cos(via_proc.numpy(), ref_img).min() > 0.99


def test_hf_export_of_other_towers_is_a_complete_itrkit_folder(tiny_run, tmp_path) -> None:
    from safetensors.torch import load_file

    run, model = tiny_run
    out = export_run(run, "hf", tmp_path / "hf-tiny")
    state = load_file(str(out / "model.safetensors"))
    assert set(state) == set(model.state_dict())  # towers included, not only what a run folder keeps
    back = load_model(out)
    imgs, caps = images(3), CAPTIONS
    assert np.array_equal(back.encode_images(imgs), model.encode_images(imgs))
    assert np.array_equal(back.encode_texts(caps), model.encode_texts(caps))
    assert json.loads((out / "model.json").read_text())["export"]["complete_state"] is True


@pytest.mark.parametrize(("fmt", "head", "needle"), [
    ("sentence-transformers", "cross", "text tower 'tiny-text' cannot be expressed as a sentence-transformers model"),
    ("onnx", "cross", "text tower 'tiny-text' cannot be expressed as an ONNX graph"),
    ("hf", "usa", "--head usa does not apply to --format hf"),
])
def test_a_run_the_format_cannot_express_is_refused_in_one_line_and_writes_nothing(tiny_run, tmp_path, fmt, head,
                                                                                     needle) -> None:
    run, _ = tiny_run
    with pytest.raises(ExportError) as e:
        export_run(run, fmt, tmp_path / "out", head=head)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(run) in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_onnx_refuses_rnn_text_towers_and_usa_needs_usa_heads(tiny_run, tmp_path) -> None:
    from itrkit.models.dual_encoder import ModelConfig, build_model

    from .conftest import save_run

    run = save_run(build_model(ModelConfig(image_tower="tiny-image", text_tower="gru", embed_dim=8)), tmp_path / "gru")
    with pytest.raises(ExportError, match=r"text tower 'gru' cannot be expressed as an ONNX graph"):
        export_run(run, "onnx", tmp_path / "o1")
    tiny, _ = tiny_run
    for fmt in ("sentence-transformers", "onnx"):
        with pytest.raises(ExportError, match=r"--head usa needs a model with USA heads"):
            export_run(tiny, fmt, tmp_path / "o2", head="usa")
    with pytest.raises(ExportError, match="already exists"):
        export_run(tiny, "hf", run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gru"]


def test_onnx_export_of_clip_towers_matches_torch(clip_run, tmp_path) -> None:
    import onnxruntime as ort

    run, model = clip_run
    out = export_run(run, "onnx", tmp_path / "onnx-clip")
    imgs, caps = images(3), ["a dog", "the cat at the dog do"]
    pixels = model.image_tower.prepare(imgs).numpy()
    sess = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(sess.run(None, {"pixel_values": pixels})[0] - model.encode_images(imgs)).max() < 1e-4
    enc = model.text_tower.prepare(caps)
    sess = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()})[0]
    assert np.abs(got - model.encode_texts(caps)).max() < 1e-4


def test_usa_head_of_a_plain_hf_text_tower_exports_alike_to_sentence_transformers_and_onnx(tiny_bert_run,
                                                                                          tmp_path) -> None:
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer

    run, model = tiny_bert_run
    assert model.text_tower.pooling == ("mean", "cls") and not model.text_tower.normalize  # concatenated cls first
    ref = model.encode_texts_uni(CAPTIONS)  # includes a caption longer than max_position_embeddings
    st = SentenceTransformer(str(export_run(run, "sentence-transformers", tmp_path / "st", head="usa")),
                             device="cpu", trust_remote_code=True)
    got = st.encode(CAPTIONS, convert_to_numpy=True)
    assert got.shape == (len(CAPTIONS), 10) and _cos(got, ref).min() >= 0.9999
    out = export_run(run, "onnx", tmp_path / "onnx", head="usa")
    pre = json.loads((out / "preprocess.json").read_text())
    assert pre["head"] == "usa" and pre["embed_dim"] == 10 and pre["text"]["max_length"] == 24
    enc = model.text_tower.prepare(CAPTIONS)
    sess = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4


def test_an_st_tower_with_dense_and_normalize_modules_round_trips_through_sentence_transformers(tiny_bert_run,
                                                                                               tmp_path) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from torch import nn

    from itrkit.models.dual_encoder import DualEncoder, ModelConfig
    from itrkit.models.towers import build_tower

    from .conftest import randomise_heads, save_run

    bert = Path(tiny_bert_run[1].text_tower.spec["path"])
    torch.manual_seed(1)
    src = tmp_path / "st-src"  # a sentence-transformers folder: Transformer, Pooling, Dense(Tanh), Normalize
    SentenceTransformer(modules=[Transformer(str(bert), max_seq_length=20), Pooling(16, pooling_mode="max"),
                                 Dense(16, 8, activation_function=nn.Tanh()), Normalize()], device="cpu").save(str(src))
    # The tower reads the pooling config in the pre-6.0 key form (all published ST folders use it).
    (src / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16,
                                                               "pooling_mode_max_tokens": True}))
    cfg = ModelConfig(image_tower="tiny-image", text_tower=f"st:{src}", embed_dim=6, trunk="none")
    model = randomise_heads(DualEncoder(build_tower("tiny-image", "image"), build_tower(f"st:{src}", "text"), cfg),
                            seed=6).eval()
    assert model.text_tower.output_dim == 8 and model.text_tower.normalize and len(model.text_tower.dense) == 1
    out = export_run(save_run(model, tmp_path / "run"), "sentence-transformers", tmp_path / "st")
    got = SentenceTransformer(str(out), device="cpu").encode(CAPTIONS, convert_to_numpy=True)
    assert _cos(got, model.encode_texts(CAPTIONS)).min() >= 0.9999
