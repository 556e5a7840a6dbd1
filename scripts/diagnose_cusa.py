"""Why does CUSA not beat a tuned InfoNCE here? Compare the image teacher's and the students'
image-image similarity structure with a semantic proxy (the similarity of the images' caption
centroids under the text teacher) on 2,000 Flickr8k training images, and print the teacher's
soft-label entropy at several temperatures.

    .venv/bin/python scripts/diagnose_cusa.py REPRO_OUT PREPARED_FLICKR8K
(REPRO_OUT = the --out of `itrkit reproduce flickr8k`, with runs/{infonce,cusa}/seed0 and teachers/.)
"""

import json
import sys

import numpy as np

from itrkit.data.records import Dataset
from itrkit.models.io import load_model
from itrkit.teachers.store import FeatureStore
from itrkit.train.data import PairData, embed_split

R = sys.argv[1]
ds = Dataset.load(sys.argv[2]).split("train")
rng = np.random.default_rng(0)
n = 2000
sel = np.sort(rng.choice(len(ds), n, replace=False))
img_store = FeatureStore.open(f"{R}/teachers/image.store")
txt_store = FeatureStore.open(f"{R}/teachers/text.store")
ids = [ds.image_ids[i] for i in sel]


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


T_img = unit(img_store.lookup(ids))
t2i = np.asarray(ds.txt2img)
cap_rows = {i: np.flatnonzero(t2i == i) for i in sel}
all_caps = [ds.caption_ids[j] for i in sel for j in cap_rows[i]]
T_txt_all = unit(txt_store.lookup(all_caps))
owner = np.repeat(np.arange(n), [len(cap_rows[i]) for i in sel])
centroid = unit(np.stack([T_txt_all[owner == k].mean(0) for k in range(n)]))
iu = np.triu_indices(n, 1)
proxy = (centroid @ centroid.T)[iu]  # semantic relatedness of two images: their captions under mpnet


def corr(S):
    a = S[iu]
    return float(np.corrcoef(a, proxy)[0, 1])


def nn_hit(S):  # is an image's nearest other image among its 10 most related by the proxy?
    S = S.copy()
    np.fill_diagonal(S, -np.inf)
    P = centroid @ centroid.T
    np.fill_diagonal(P, -np.inf)
    top = np.argsort(-P, 1)[:, :10]
    return float(np.mean([S[k].argmax() in top[k] for k in range(n)]))


def entropy_at(S, T, B=128):
    out = []
    for _ in range(50):
        b = rng.choice(n, B, replace=False)
        L = S[np.ix_(b, b)] / T
        L = L - L.max(1, keepdims=True)
        p = np.exp(L)
        p /= p.sum(1, keepdims=True)
        out.append(float(-(p * np.log(p + 1e-30)).sum(1).mean()))
    return float(np.mean(out))


res = {}
res["teacher Lite2 (image)"] = (corr(T_img @ T_img.T), nn_hit(T_img @ T_img.T))
sub = Dataset(records=[ds.records[i] for i in sel], name="diag")
for name in ["infonce", "cusa"]:
    m = load_model(f"{R}/runs/{name}/seed0")
    e = embed_split(m, PairData(sub, m, True, None))
    E = unit(e["image_embeds"])
    res[f"{name} student, cross head (image)"] = (corr(E @ E.T), nn_hit(E @ E.T))
    if name == "cusa":
        U = unit(e["image_uni"])
        res["cusa student, USA head (image)"] = (corr(U @ U.T), nn_hit(U @ U.T))
    if name == "infonce":
        pd = PairData(sub, m, True, None)
        F = unit(pd.image_features.numpy())
        res["frozen Lite0 features (image)"] = (corr(F @ F.T), nn_hit(F @ F.T))
for k, (c, h) in res.items():
    print(f"{k:40s} corr with caption-centroid similarity {c:.3f}   NN in proxy top-10 {h:.3f}")
for T in (1.0, 0.1, 0.05):
    print(
        f"teacher row entropy at T={T}: image {entropy_at(T_img @ T_img.T, T):.3f} (uniform {np.log(128):.3f})"
    )
json.dump(res, open(f"{R}/diagnosis.json", "w"), indent=1)
