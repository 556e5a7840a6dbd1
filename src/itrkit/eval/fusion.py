"""Evaluating fusion matchers: a split's region features and tokens (:class:`FusionSplit`), its
full score matrix in blocks, the re-ranker's protocol (ITC ranking of the whole gallery, each
query's top ``rerank_k`` re-scored by the ITM head, X2VLM inference) and ensembles of runs
(SGRAF = the mean of an SGR's and a SAF's score matrices).

Scoring runs where the model's parameters are (``model.to(device)``; ``device`` arguments take
``auto``/``cpu``/``cuda``/``cuda:N``/``mps``): region features and tokens go there block by block
and the score matrix comes back to the CPU.

Score matrices of a run's test split are cached in the run folder (``scores_<split>.safetensors``,
keyed by data fingerprint, split and grid store) and reused by ensembles.

With ``model.word_features=minilm`` the captions' word features are the frozen all-MiniLM-L6-v2
token states (``last_hidden_state``, cut ``top:0`` of the prefix cache, :func:`caption_states`;
with ``model.text_trainable=top:N`` the states entering MiniLM's last N layers, which the model
runs): computed once per set of caption texts and cut into ``<cache_dir>/prefix/`` (float16 by
default, ``model.prefix_dtype``) and read per batch (training) or per caption chunk (scoring every
pair); tokens are MiniLM's ids and lengths the sums of the cached attention masks.

**Re-ranker scores and keys.** Each query's top ``rerank_k`` first-stage candidates get
``s = itc + w · itm`` (``w = model.itm_weight``; itc: the first stage's cosine, the value it
ranked by; itm: the ITM *logit*). The logit, not log σ(logit): log σ saturates at 0 for every
confident match, which flattens exactly the top of the list being re-ordered, while the logit
stays linear in the evidence there (and is, like cosine / τ, a log-odds). ``w = inf`` orders the
top k by the ITM alone (X2VLM, the default); ``w = 0`` is the first stage's own order. Candidates
outside the top k keep their first-stage order below. The first stage is the model's own ITC
head, or with ``model.itc_run`` a trained, frozen itrkit dual encoder (:func:`load_itc_run`;
its embeddings of a split come from :func:`itrkit.models.embed.embed_dataset`, through the
feature cache). Metrics: the plain keys (``rsum``, ``i2t_R@1`` …) are the final score's, ``itc_*``
the first stage alone, and ``itm_only_*`` (when ``w`` is finite) the ITM order within the same
top k. :func:`choose_rerank` picks ``(rerank_k, itm_weight)`` by dev RSUM.

**Flickr8k human judgments** (``protocol="flickr8k-human"``, :func:`fusion_human_metrics`,
:func:`split_human_metrics`): graded retrieval needs each query's whole ranking and the two τ a
score per judged pair. A score-matrix model (or ensemble) gives both from its matrix. A re-ranker
gives them from :func:`rerank_scores`: its final ranking of each direction as a position-coded
matrix (the same blocks and ITM calls as its retrieval metrics) and its final score ``itc + w · itm``
of any pair (ITM alone for ``w = inf``, the first stage for ``rerank_k = 0``), whether or not the
pair made a top k.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itrkit.data.records import Dataset
from itrkit.errors import ConfigError, DataError
from itrkit.eval.rerank import make_rerank
from itrkit.eval.retrieval import evaluate_retrieval, l2_normalize, metrics_from_scores
from itrkit.models.fusion_base import FusionBatch, FusionMatcher, frozen_minilm, lengths_from_mask, minilm_cut
from itrkit.utils.device import move_to, resolve_device


def model_device(model: Any) -> torch.device:
    """The device of a model's parameters (the CPU for one without parameters)."""
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def minilm_tower(device: torch.device | str | None = None) -> Any:
    """The frozen all-MiniLM-L6-v2 text tower (from its wheel, offline), in eval mode."""
    tower = frozen_minilm()
    if device is not None:
        tower.to(device)
    return tower


def caption_states(texts: list[str], cache_dir: str | Path | None = None, dtype: str = "float16",
                   device: torch.device | str | None = None, text_trainable: str = "frozen") -> Any:
    """The frozen MiniLM token states (``last_hidden_state``; with ``text_trainable=top:N`` the
    states entering its last N layers) + attention masks + ids of ``texts``
    (:class:`itrkit.models.prefix.PrefixStates`, rows in ``texts`` order), keyed by the texts
    themselves: other captions are another cache entry, never the wrong states."""
    from itrkit.models.prefix import cached_prefix

    tower = minilm_tower(device)
    return cached_prefix(tower, minilm_cut(text_trainable), list(texts), list(texts), cache_dir, dtype=dtype,
                         batch_size=128, desc="caption states (MiniLM)")


@dataclasses.dataclass
class ReRankBatch(FusionBatch):
    """A re-ranker's training batch with its rows' first-stage dual-encoder embeddings
    (``model.itc_run``; L2-normalised, frozen), for mining the ITM's hard negatives."""

    itc_image: torch.Tensor | None = None  # (B, D) the dual encoder's embedding of each row's image
    itc_text: torch.Tensor | None = None  # (B, D) ... of each row's caption


class FusionSplit:
    """One split: grid rows per image, tokenised captions, ``txt2img``; teacher rows when attached.

    ``grid`` is an open grid store (``itrkit.teachers.grid.open_grid_store``) that has every image.
    ``word_states`` (models with ``word_features=minilm``): the captions' :func:`caption_states`;
    tokens are then MiniLM's ids and lengths the cached attention masks' sums, and ``prepare_texts``
    is not used.
    """

    def __init__(self, ds: Dataset, grid: Any, prepare_texts: Callable[[list[str]], dict[str, torch.Tensor]] | None,
                 word_states: Any = None) -> None:
        g = grid.header.get("grid")
        self.ds = ds
        self.grid = grid
        self.grid_rows = grid.index_for(ds.image_ids)
        self.grid_shape = (int(g[0]), int(g[1]))
        self.txt2img = ds.txt2img
        self.word_states = word_states
        if word_states is not None:
            if len(word_states) != len(ds.texts):
                raise DataError(f"caption states of {word_states.folder} have {len(word_states)} rows for the "
                                f"{len(ds.texts)} captions of {ds.name}")
            every = np.arange(len(ds.texts))
            mask = torch.from_numpy(word_states.arrays["attention_mask"].rows(every).astype(np.int64))
            self.lengths = lengths_from_mask(mask)
            self.tokens = torch.from_numpy(word_states.arrays["input_ids"].rows(every).astype(np.int64))
        elif prepare_texts is None:
            raise ConfigError("FusionSplit needs prepare_texts or word_states")
        else:
            enc = prepare_texts(ds.texts)
            self.tokens, self.lengths = enc["input_ids"], enc["lengths"].long()
        counts = np.array([len(r.captions) for r in ds.records])
        if (counts == 0).any():
            raise DataError(f"image '{ds.records[int(np.argmin(counts))].id}' of {ds.name} has no caption")
        self.n_captions = counts
        self.first_caption = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.teacher_image: tuple[Any, np.ndarray] | None = None
        self.teacher_text: tuple[Any, np.ndarray] | None = None
        # (image rows, caption rows) of a frozen first-stage dual encoder (model.itc_run)
        self.itc_embeds: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach_itc(self, image_embeds: Any, text_embeds: Any) -> None:
        """A first-stage dual encoder's L2-normalised embeddings of this split (rows in split order):
        they rank the gallery at evaluation and go with each training batch (:class:`ReRankBatch`)."""
        img = torch.as_tensor(np.asarray(image_embeds, dtype=np.float32))
        txt = torch.as_tensor(np.asarray(text_embeds, dtype=np.float32))
        if img.ndim != 2 or txt.ndim != 2 or len(img) != len(self) or len(txt) != len(self.lengths) \
                or img.shape[1] != txt.shape[1]:
            raise DataError(f"first-stage embeddings {tuple(img.shape)} / {tuple(txt.shape)} do not fit the "
                            f"{len(self)} images and {len(self.lengths)} captions of {self.ds.name}")
        self.itc_embeds = (img, txt)

    def __len__(self) -> int:
        return len(self.ds)

    def regions(self, img_idx: np.ndarray) -> torch.Tensor:
        r, c = self.grid_shape
        return self.grid.rows(self.grid_rows[np.asarray(img_idx)]).view(-1, r, c)

    def attach_teachers(self, image_store: Any, text_store: Any, shuffle_seed: int | None = None) -> None:
        """Teacher rows of each image / caption; ``shuffle_seed`` permutes them (the control)."""
        rows_i = image_store.index_for(self.ds.image_ids)
        rows_t = text_store.index_for(self.ds.caption_ids)
        if shuffle_seed is not None:
            rows_i = rows_i[np.random.default_rng([shuffle_seed, 1]).permutation(len(rows_i))]
            rows_t = rows_t[np.random.default_rng([shuffle_seed, 2]).permutation(len(rows_t))]
        self.teacher_image = (image_store, rows_i)
        self.teacher_text = (text_store, rows_t)

    def epoch_captions(self, seed: int, epoch: int) -> np.ndarray:
        """One random caption per image for this epoch (seeded: resumed runs redraw the same)."""
        draw = np.random.default_rng([seed, epoch, 1]).random(len(self))
        return self.first_caption + np.minimum((draw * self.n_captions).astype(np.int64), self.n_captions - 1)

    def words(self, cap_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (n, L, 384) float32, attention mask (n, L) int64) of captions ``cap_idx`` from the
        cache, L = their longest caption (``word_features=minilm``)."""
        if self.word_states is None:
            raise ConfigError(f"{self.ds.name}: this split holds tokens, not caption states (word_features=gru)")
        got = self.word_states.batch(np.asarray(cap_idx, dtype=np.int64))
        return got["hidden"], got["attention_mask"]

    def word_reader(self, order: np.ndarray | None = None) -> Callable[[int, int], torch.Tensor] | None:
        """States of caption rows ``[start, stop)`` of ``order`` (default: split order), read per chunk."""
        if self.word_states is None:
            return None
        rows = np.arange(len(self.lengths)) if order is None else np.asarray(order, dtype=np.int64)
        return lambda start, stop: self.words(rows[start:stop])[0]

    def batch(self, img_idx: np.ndarray, cap_idx: np.ndarray) -> FusionBatch:
        img_ids = torch.from_numpy(np.asarray(img_idx, dtype=np.int64))
        if self.word_states is not None:
            got = self.word_states.batch(np.asarray(cap_idx, dtype=np.int64))
            b = FusionBatch(regions=self.regions(img_idx), tokens=got["input_ids"],
                            lengths=lengths_from_mask(got["attention_mask"]), img_ids=img_ids,
                            word_states=got["hidden"], word_mask=got["attention_mask"])
        else:
            b = FusionBatch(regions=self.regions(img_idx), tokens=self.tokens[cap_idx], lengths=self.lengths[cap_idx],
                            img_ids=img_ids)
        if self.teacher_image is not None and self.teacher_text is not None:
            b.t_img = self.teacher_image[0].rows(self.teacher_image[1][img_idx])
            b.t_txt = self.teacher_text[0].rows(self.teacher_text[1][cap_idx])
        if self.itc_embeds is not None:
            fields = {f.name: getattr(b, f.name) for f in dataclasses.fields(FusionBatch)}
            b = ReRankBatch(**fields, itc_image=self.itc_embeds[0][np.asarray(img_idx)],
                            itc_text=self.itc_embeds[1][np.asarray(cap_idx)])
        return b


@torch.no_grad()
def split_scores(model: FusionMatcher, split: FusionSplit, progress: bool = True, img_chunk: int = 100,
                 txt_chunk: int = 500) -> torch.Tensor:
    """The (images × captions) score matrix of a split; captions are scored in length order so each
    block is padded only to similar lengths, then put back in caption order."""
    order = torch.argsort(split.lengths, stable=True)
    dev = model_device(model)
    regions, tokens, lengths = move_to((split.regions(np.arange(len(split))), split.tokens[order],
                                        split.lengths[order]), dev, non_blocking=True)
    s = model.score_all(regions, tokens, lengths, img_chunk=img_chunk, txt_chunk=txt_chunk,
                        progress=progress, word_states=split.word_reader(order.numpy())).cpu()
    out = torch.empty_like(s)
    out[:, order] = s
    return out


def is_reranker(model: Any) -> bool:
    """A model that ranks with embeddings and re-scores the top candidates (no full score matrix)."""
    return callable(getattr(model, "pair_scorer", None)) and callable(getattr(model, "encode_split", None))


class _PairMemo:
    """A pair scorer that scores each (image, caption) pair once and then answers from memory, so
    the ITM-only, combined and dev-grid orderings of one split share one ITM pass. A batch with no
    known pair is passed through unchanged (the scores are those of a plain call)."""

    def __init__(self, score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_txt: int) -> None:
        self.score_pairs, self.n_txt = score_pairs, int(n_txt)
        self.known: dict[int, float] = {}

    def __call__(self, img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        keys = (img_idx.long() * self.n_txt + txt_idx.long()).tolist()
        miss = [p for p, key in enumerate(keys) if key not in self.known]
        if miss:
            sel = slice(None) if len(miss) == len(keys) else torch.tensor(miss)
            got = torch.as_tensor(self.score_pairs(img_idx[sel], txt_idx[sel])).detach().reshape(-1)
            if got.numel() != len(miss):
                raise ValueError(f"score_pairs returned {got.numel()} scores for {len(miss)} pairs")
            for p, v in zip(miss, got.to(torch.float64).cpu().tolist()):
                self.known[keys[p]] = v
        return torch.tensor([self.known[key] for key in keys], dtype=torch.float64)


def _final_score_rerank(memos: dict[str, _PairMemo], k: int, itm_weight: float, batch_size: int,
                        progress: bool) -> Any:
    """The ``rerank`` callback of :func:`evaluate_retrieval` for ``s = itc + w · itm`` on each query's
    top ``k`` (``w = inf``: ITM alone); itc is the block's own first-stage score of the pair, so
    ``w = 0`` reproduces the first-stage order exactly."""

    def rerank(scores: torch.Tensor, rows: torch.Tensor, direction: str) -> torch.Tensor:
        itm = memos[direction]
        if math.isinf(itm_weight):
            score_pairs = itm
        else:
            pos = {int(q): r for r, q in enumerate(rows.reshape(-1).tolist())}

            def score_pairs(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
                q, c = (img_idx, txt_idx) if direction == "i2t" else (txt_idx, img_idx)
                r = torch.tensor([pos[int(x)] for x in q.tolist()], dtype=torch.long)
                return scores[r, c.long()].to(torch.float64) + itm_weight * itm(img_idx, txt_idx)

        return make_rerank(score_pairs, k, batch_size=batch_size, progress=progress)(scores, rows, direction)

    return rerank


class _Encoded:
    """One encoding of a split for re-ranking: first-stage embeddings + the ITM's memoised pair scorer."""

    def __init__(self, model: Any, regions: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                 word_states: Any, first_stage: tuple[Any, Any] | None, progress: bool) -> None:
        regions, tokens, lengths = move_to((regions, tokens, lengths), model_device(model), non_blocking=True)
        enc = model.encode_split(regions, tokens, lengths, progress=progress, word_states=word_states)
        if first_stage is None:
            self.img_emb, self.txt_emb = enc["img_emb"], enc["txt_emb"]
        else:
            self.img_emb, self.txt_emb = (torch.as_tensor(x).float().cpu() for x in first_stage)
            if len(self.img_emb) != len(regions) or len(self.txt_emb) != len(tokens):
                raise DataError(f"first-stage embeddings of {len(self.img_emb)} images / {len(self.txt_emb)} "
                                f"captions for a split of {len(regions)} / {len(tokens)}")
        scorer = model.pair_scorer(enc["img_state"], enc["words"], enc["lengths"],
                                   None if first_stage is None else (self.img_emb, self.txt_emb))
        # One memory per direction: each direction's pairs are scored in the batches a plain
        # re-ranking would use (bit for bit the same scores), later orderings reuse them.
        self.memos = {d: _PairMemo(scorer, len(tokens)) for d in ("i2t", "t2i")}

    def metrics(self, txt2img: Any, k: int, itm_weight: float, batch_size: int, chunk_size: int,
                progress: bool) -> dict[str, float]:
        rerank = None if k == 0 else _final_score_rerank(self.memos, k, itm_weight, batch_size, progress)
        return evaluate_retrieval(self.img_emb, self.txt_emb, txt2img, chunk_size, rerank=rerank)

    def orders(self, k: int, itm_weight: float, batch_size: int, chunk_size: int,
               progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S, i2t, t2i), each (N_img, N_txt) float32: the first-stage cosines and the final
        rankings as matrices (i2t: row n sorted descending is image n's ranking; t2i: column m is
        caption m's). Built from the blocks :meth:`metrics` ranks (the same ``chunk_size`` query
        rows, the same float32 first-stage scores per direction, the same callback and memories),
        so their orders are exactly the ones behind the retrieval metrics."""
        img, txt = l2_normalize(self.img_emb), l2_normalize(self.txt_emb)
        rerank = None if k == 0 else _final_score_rerank(self.memos, k, itm_weight, batch_size, progress)

        def direction(queries: torch.Tensor, gallery: torch.Tensor, name: str,
                      keep_first: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
            n = len(queries)
            first = torch.empty(n, len(gallery), dtype=torch.float32) if keep_first or rerank is None else None
            final = first if rerank is None else torch.empty(n, len(gallery), dtype=torch.float32)
            assert final is not None
            for s in range(0, n, chunk_size):
                rows = torch.arange(s, min(s + chunk_size, n))
                sc = torch.matmul(queries[s:s + len(rows)], gallery.T)
                if first is not None:
                    first[rows] = sc
                if rerank is not None:
                    final[rows] = torch.as_tensor(rerank(sc, rows, name), dtype=torch.float32)
            return first, final

        first, i2t = direction(img, txt, "i2t", True)
        _, t2i = direction(txt, img, "t2i", False)
        assert first is not None
        return first, i2t, t2i.T

    def itm_of_pairs(self, img_idx: torch.Tensor, txt_idx: torch.Tensor, batch_size: int,
                     progress: bool) -> torch.Tensor:
        """ITM logits (float64) of any pairs: from either direction's memory when a re-ranking
        already scored them, the rest scored once (in ``batch_size`` pairs) and remembered."""
        from itrkit.utils.progress import progress as progress_lines

        known_i, known_t = self.memos["i2t"].known, self.memos["t2i"].known
        n_txt = self.memos["i2t"].n_txt
        keys = (img_idx.long() * n_txt + txt_idx.long()).tolist()
        miss = torch.tensor(sorted({q for q in keys if q not in known_i and q not in known_t}), dtype=torch.long)
        starts = range(0, len(miss), batch_size)
        for s in progress_lines(starts, desc="ITM of judged pairs", unit="batch", enabled=progress and len(miss) > 0):
            b = miss[s:s + batch_size]
            self.memos["i2t"](b // n_txt, b % n_txt)
        return torch.tensor([known_i[q] if q in known_i else known_t[q] for q in keys], dtype=torch.float64)


@torch.no_grad()
def evaluate_reranker(model: Any, regions: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, txt2img: Any,
                      progress: bool = True, rerank_k: int | None = None, itc: bool = True,
                      chunk_size: int = 1024, word_states: Any = None, itm_weight: float | None = None,
                      first_stage: tuple[Any, Any] | None = None) -> dict[str, dict[str, float]]:
    """``{"itc": metrics of the first stage, "rerank": of the final score s = itc + w · itm,
    "itm_only": of the ITM order (only when w is finite)}`` from one encoding of the split: the
    first stage ranks the whole gallery, each query's top ``rerank_k`` (default the model's; 0 =
    the first stage alone) is re-scored (see the module doc). ``itm_weight``: w (default the
    model's). ``first_stage``: (image, caption) embeddings of a frozen dual encoder
    (``model.itc_run``) instead of the model's own ITC head. ``word_states``: the captions' MiniLM
    states (``word_features=minilm``; a tensor or a reader of rows ``[start, stop)``)."""
    k, w = _rerank_setting(model, rerank_k, itm_weight)
    was = model.training
    model.eval()
    try:
        enc = _Encoded(model, regions, tokens, lengths, word_states, first_stage, progress)
        return _reranker_metrics(enc, txt2img, k, w, model.pair_batch, chunk_size, progress, itc)
    finally:
        model.train(was)


def _rerank_setting(model: Any, rerank_k: int | None, itm_weight: float | None) -> tuple[int, float]:
    """(k, w): the given values, else the model's saved ones; checked."""
    k = model.rerank_k if rerank_k is None else int(rerank_k)
    w = float(getattr(model, "itm_weight", math.inf) if itm_weight is None else itm_weight)
    if k < 0 or not w >= 0:
        raise ConfigError(f"rerank_k must be >= 0 and itm_weight >= 0, got {k} and {w}")
    return k, w


def _reranker_metrics(enc: _Encoded, txt2img: Any, k: int, w: float, batch_size: int, chunk_size: int,
                      progress: bool, itc: bool = True) -> dict[str, dict[str, float]]:
    """The ``itc`` / ``rerank`` / ``itm_only`` metrics of :func:`evaluate_reranker` from one encoding."""
    out: dict[str, dict[str, float]] = {}
    if itc or k == 0:
        out["itc"] = enc.metrics(txt2img, 0, w, batch_size, chunk_size, progress)
    out["rerank"] = out["itc"] if k == 0 else enc.metrics(txt2img, k, w, batch_size, chunk_size, progress)
    if k and not math.isinf(w):
        out["itm_only"] = enc.metrics(txt2img, k, math.inf, batch_size, chunk_size, progress)
    return out


def _flat_reranker_metrics(r: dict[str, dict[str, float]]) -> dict[str, float]:
    """The plain keys of the final score, ``itc_*`` and ``itm_only_*`` beside (:func:`split_metrics`)."""
    out = {**r["rerank"], **{f"itc_{k}": v for k, v in r["itc"].items()}}
    out.update({f"itm_only_{k}": v for k, v in r.get("itm_only", {}).items()})
    return out


@dataclasses.dataclass
class RerankScores:
    """A re-ranker's final rankings of a split as score matrices, for metrics that need each
    query's whole ranking rather than the rank of its own match (the Flickr8k human judgments).

    ``i2t`` / ``t2i`` hold :func:`itrkit.eval.rerank.make_rerank`'s position-coded values (the
    item at final position p of a query gets G − p), so sorting them descending gives the final
    order exactly; they differ because each direction re-ranks its own top k."""

    first_stage: torch.Tensor  # (N_img, N_txt) float32: S, the first stage's cosines
    i2t: torch.Tensor  # (N_img, N_txt): row n sorted descending = image n's final caption ranking
    t2i: torch.Tensor  # (N_img, N_txt): column m sorted descending = caption m's final image ranking
    pair_scores: Callable[[Any, Any], np.ndarray]  # the final score function of pairs (float64)
    metrics: dict[str, float]  # the split_metrics keys of the same ranking
    rerank_k: int
    itm_weight: float


@torch.no_grad()
def rerank_scores(model: Any, split: FusionSplit, progress: bool = True, rerank_k: int | None = None,
                  itm_weight: float | None = None, chunk_size: int = 1024) -> RerankScores:
    """A re-ranker's :class:`RerankScores` on ``split`` from one encoding and one ITM pass.

    First stage S: the split's attached dual encoder (``model.itc_run``) else the model's ITC head;
    ``rerank_k`` / ``itm_weight`` default to the model's saved ones. The i2t matrix is the
    re-ranking callback applied to S's image rows (direction "i2t"), the t2i matrix to the
    caption rows (direction "t2i"), transposed back, in the row blocks of :func:`split_metrics`
    (the orders behind its metrics). ``pair_scores(img_rows, cap_rows)`` is the final score of a
    pair, wherever it ranks: ``S + w · itm`` (w finite), ``itm`` (w = inf), ``S`` (k = 0 or w = 0);
    ITM logits come from the memories of the re-ranking, so no pair is scored twice."""
    k, w = _rerank_setting(model, rerank_k, itm_weight)
    batch = model.pair_batch
    was = model.training
    model.eval()
    try:
        enc = _Encoded(model, split.regions(np.arange(len(split))), split.tokens, split.lengths,
                       split.word_reader(), split.itc_embeds, progress)
        metrics = _flat_reranker_metrics(_reranker_metrics(enc, split.txt2img, k, w, batch, chunk_size, progress))
        first, i2t, t2i = enc.orders(k, w, batch, chunk_size, progress)
    finally:
        model.train(was)

    def pair_scores(img_rows: Any, cap_rows: Any) -> np.ndarray:
        ii = torch.from_numpy(np.ascontiguousarray(img_rows, dtype=np.int64).reshape(-1))
        cc = torch.from_numpy(np.ascontiguousarray(cap_rows, dtype=np.int64).reshape(-1))
        itc = first[ii, cc].to(torch.float64)
        if k == 0 or w == 0:
            return itc.numpy()
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                itm = enc.itm_of_pairs(ii, cc, batch, progress)
        finally:
            model.train(was)
        return (itm if math.isinf(w) else itc + w * itm).numpy()

    return RerankScores(first, i2t, t2i, pair_scores, metrics, k, w)


RERANK_KS = (8, 16, 32)
ITM_WEIGHTS = (0.0, 0.1, 0.3, 1.0, 3.0, math.inf)


@torch.no_grad()
def choose_rerank(model: Any, split: FusionSplit, ks: Sequence[int] = RERANK_KS,
                  weights: Sequence[float] = ITM_WEIGHTS, metric: str = "rsum",
                  progress: bool = True) -> dict[str, Any]:
    """The ``(rerank_k, itm_weight)`` of the grid ``ks × weights`` with the best ``metric`` on
    ``split`` (a dev split: never the test split), first in grid order on ties; ``w = inf`` is the
    ITM order within the top k. One encoding and one ITM pass (the largest k's candidates) serve
    the whole grid. Returns ``{"rerank_k", "itm_weight", metric, "grid": [{"rerank_k",
    "itm_weight", metric}, …]}``; the model is left unchanged (:meth:`ReRanker.set_rerank` applies it)."""
    from itrkit.eval.evaluators import greater_is_better

    if not ks or not weights:
        raise ConfigError("choose_rerank needs at least one k and one weight")
    if any(int(k) < 1 for k in ks) or any(not float(w) >= 0 for w in weights):
        raise ConfigError(f"choose_rerank: k must be >= 1 and weights >= 0, got {list(ks)} and {list(weights)}")
    was = model.training
    model.eval()
    try:
        enc = _Encoded(model, split.regions(np.arange(len(split))), split.tokens, split.lengths,
                       split.word_reader(), split.itc_embeds, progress)
        # The largest k first: its candidates contain every smaller k's, so the ITM runs once.
        big = max(int(k) for k in ks)
        enc.metrics(split.txt2img, big, math.inf, model.pair_batch, 1024, progress)
        grid = []
        for k in ks:
            for w in weights:
                m = enc.metrics(split.txt2img, int(k), float(w), model.pair_batch, 1024, progress)
                if metric not in m:
                    raise ConfigError(f"choose_rerank: '{metric}' is not a metric (e.g. rsum)")
                grid.append({"rerank_k": int(k), "itm_weight": float(w), metric: m[metric]})
    finally:
        model.train(was)
    up = greater_is_better(metric)
    best = grid[0]
    for g in grid[1:]:
        if (g[metric] > best[metric]) if up else (g[metric] < best[metric]):
            best = g
    return {**best, "grid": grid}


def split_metrics(model: FusionMatcher, split: FusionSplit, progress: bool = True, rerank_k: int | None = None,
                  itm_weight: float | None = None) -> tuple[dict[str, float], torch.Tensor | None]:
    """Retrieval metrics (docs/method.md §4) of a split, and its full score matrix when the model
    scores every pair. A re-ranker is evaluated by its own protocol (first stage: the split's
    attached dual encoder when it has one, else the model's ITC head), with the first stage's own
    metrics beside as ``itc_*`` keys and, for a finite ``itm_weight``, the ITM order as ``itm_only_*``."""
    if is_reranker(model):
        r = evaluate_reranker(model, split.regions(np.arange(len(split))), split.tokens, split.lengths, split.txt2img,
                              progress=progress, rerank_k=rerank_k, word_states=split.word_reader(),
                              itm_weight=itm_weight, first_stage=split.itc_embeds)
        return _flat_reranker_metrics(r), None
    scores = split_scores(model, split, progress=progress)
    return metrics_from_scores(scores, split.txt2img), scores


# --- Flickr8k human judgments ---------------------------------------------------------------------
def human_annotations(ds: Dataset, annotations_dir: str | Path | None = None) -> tuple[list[str], list[str], Path]:
    """(image file names, caption ids ``x.jpg#k``, annotation folder) of a Flickr8k split, checked
    before any scoring: the folder is ``annotations_dir`` or the one found beside the images
    (:func:`itrkit.eval.flickr8k_human.find_annotations_dir`); a missing folder or file is a
    one-line :class:`ConfigError` naming it."""
    from itrkit.eval.flickr8k_human import CROWDFLOWER_FILE, EXPERT_FILE, find_annotations_dir
    from itrkit.eval.protocols import flickr8k_names

    names, caps = flickr8k_names(ds)
    if annotations_dir is None:
        found = find_annotations_dir(ds.image_paths)
        if found is None:
            where = Path(ds.image_paths[0]).parent if len(ds) else Path(".")
            raise ConfigError(f"protocol flickr8k-human: no {EXPERT_FILE} and {CROWDFLOWER_FILE} found in {where}, "
                              f"its parent or {where.parent / 'Flickr8k_text'}; pass the annotations folder (--annotations DIR)")
        return names, caps, found
    folder = Path(annotations_dir)
    if not folder.is_dir():
        raise ConfigError(f"protocol flickr8k-human: annotations folder {folder} does not exist")
    for f in (EXPERT_FILE, CROWDFLOWER_FILE):
        if not (folder / f).is_file():
            raise ConfigError(f"protocol flickr8k-human: no {f} in the annotations folder {folder}")
    return names, caps, folder


def split_human_metrics(model: Any, split: FusionSplit, annotations_dir: str | Path | None = None,
                        progress: bool = True, rerank_k: int | None = None,
                        itm_weight: float | None = None) -> dict[str, float]:
    """:func:`split_metrics` plus the Flickr8k human-judgment metrics (the ``flickr8k-human``
    protocol) of a fusion matcher on a Flickr8k split: a score-matrix model ranks by its matrix and
    its τ use the pair's score; a re-ranker uses :func:`rerank_scores` (its final rankings and
    final pair scores)."""
    metrics, human = _split_human(model, split, human_annotations(split.ds, annotations_dir), progress,
                                  rerank_k, itm_weight)
    return {**metrics, **human}


def _split_human(model: Any, split: FusionSplit, ann: tuple[list[str], list[str], Path], progress: bool,
                 rerank_k: int | None, itm_weight: float | None) -> tuple[dict[str, float], dict[str, float]]:
    """(split_metrics keys, human-judgment keys) of :func:`split_human_metrics` from one scoring."""
    from itrkit.eval.flickr8k_human import evaluate_flickr8k_human_scores

    names, caps, folder = ann
    if is_reranker(model):
        r = rerank_scores(model, split, progress=progress, rerank_k=rerank_k, itm_weight=itm_weight)
        return r.metrics, evaluate_flickr8k_human_scores(r.i2t, names, caps, folder, t2i_scores=r.t2i,
                                                         pair_scores=r.pair_scores)
    metrics, scores = split_metrics(model, split, progress=progress)
    if scores is None:  # only a re-ranker has no score matrix
        raise ConfigError(f"{type(model).__name__} gave no score matrix for the Flickr8k human judgments")
    return metrics, evaluate_flickr8k_human_scores(scores, names, caps, folder)


class FusionEvaluator:
    """Validation of a fusion matcher on one split (sentence-transformers' evaluator contract):
    ``primary_metric``, ``greater_is_better``, ``__call__(model) -> metrics``."""

    def __init__(self, split: FusionSplit, primary_metric: str = "rsum", progress: bool = True) -> None:
        from itrkit.eval.evaluators import greater_is_better

        self.split, self.primary_metric, self.progress = split, primary_metric, progress
        self.greater_is_better = greater_is_better(primary_metric)

    def __call__(self, model: FusionMatcher) -> dict[str, float]:
        return split_metrics(model, self.split, progress=self.progress)[0]


# --- score matrices and ensembles -------------------------------------------------------------------
def ensemble_scores(*score_matrices: torch.Tensor) -> torch.Tensor:
    """SGRAF = the mean of separately trained SGR and SAF models' score matrices."""
    if not score_matrices:
        raise ConfigError("an ensemble needs at least one score matrix")
    shapes = {tuple(s.shape) for s in score_matrices}
    if len(shapes) != 1:
        raise ConfigError(f"score matrices of an ensemble must have one shape, got {sorted(shapes)}")
    return torch.stack([s.float() for s in score_matrices]).mean(dim=0)


def _scores_meta(ds: Dataset, split: str, grid_store: str) -> dict[str, str]:
    return {"dataset": ds.fingerprint(), "split": split, "images": str(len(ds)), "grid_store": str(Path(grid_store).resolve())}


def save_scores(scores: torch.Tensor, path: Path, ds: Dataset, split: str, grid_store: str) -> None:
    from itrkit.models.io import save_state_file

    save_state_file({"scores": scores.float()}, path, metadata=_scores_meta(ds, split, grid_store))


def load_scores(path: Path, ds: Dataset, split: str, grid_store: str) -> torch.Tensor | None:
    """A saved score matrix if it was computed for exactly this data, split and grid store."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}) != _scores_meta(ds, split, grid_store):
                return None
            return f.get_tensor("scores")
    except Exception:  # a damaged cache is recomputed, never trusted
        return None


def _run_config(run: Path) -> dict[str, Any]:
    import yaml

    cfg_path = run / "config.yaml"
    return (yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}) if cfg_path.is_file() else {}


def _run_cache_dir(run: Path, cache_dir: str | Path | None) -> str | Path | None:
    """``cache_dir`` if given, else the run's own (its config.yaml), else the default cache."""
    return cache_dir or _run_config(Path(run)).get("cache_dir") or None


def _run_inputs(run: Path, data: str | Path | None, split: str, grid_store: str | None,
                max_images: int) -> tuple[Dataset, str, Dataset]:
    """(the split to evaluate, the grid store, the whole dataset)."""
    cfg = _run_config(run)
    cdata = cfg.get("data") or {}
    data = data or cdata.get("path")
    grid_store = grid_store or cdata.get("grid_store")
    if not data or not grid_store:
        raise ConfigError(f"{run}: give --data and --grid (the run has no config.yaml naming them)")
    full = Dataset.load(data)
    return full.split(split).subset(max_images or None), str(grid_store), full


def itc_run_of(model: Any) -> str:
    """The first-stage dual-encoder run of a re-ranker (``model.itc_run``), "" for none."""
    return str(getattr(getattr(model, "options", None), "itc_run", "") or "")


def load_itc_run(run: str | Path, dataset: Dataset) -> Any:
    """The frozen first-stage :class:`~itrkit.models.dual_encoder.DualEncoder` of ``model.itc_run``,
    checked to be a dual-encoder run trained on ``dataset`` (the whole dataset: same records,
    captions and image files, so its training split is the re-ranker's and the test split unseen);
    anything else is a one-line :class:`ConfigError` naming the folder."""
    from itrkit.errors import ItrkitError
    from itrkit.models.io import is_fusion_run, load_model

    folder = Path(run)
    if not folder.is_dir():
        raise ConfigError(f"model.itc_run: no run folder at {run}")
    try:
        fusion = is_fusion_run(folder)
    except ItrkitError:
        raise ConfigError(f"model.itc_run: {run} holds no trained model (model/model.json)") from None
    if fusion:
        raise ConfigError(f"model.itc_run: {run} is a fusion run; the first stage must be a dual-encoder run "
                          "(itrkit train --config infonce …)")
    data_path = (_run_config(folder).get("data") or {}).get("path")
    if not data_path:
        raise ConfigError(f"model.itc_run: {run} has no config.yaml naming its data.path")
    try:
        theirs = Dataset.load(data_path).fingerprint()
    except ItrkitError:
        raise ConfigError(f"model.itc_run: {run} was trained on {data_path}, which cannot be read") from None
    if theirs != dataset.fingerprint():
        raise ConfigError(f"model.itc_run: {run} was trained on other data ({data_path}), not {dataset.name}")
    try:
        return load_model(folder)
    except ItrkitError as e:
        raise ConfigError(f"model.itc_run: {e}") from None


def attach_itc_run(split: FusionSplit, itc_model: Any, cache_dir: str | Path | None = None,
                   device: torch.device | str | None = None) -> FusionSplit:
    """The frozen dual encoder's L2-normalised embeddings of ``split`` (through the feature cache,
    :func:`itrkit.models.embed.embed_dataset`), attached to the split; embedded on ``device``."""
    from itrkit.models.embed import embed_dataset

    if device is not None:
        itc_model.to(device)
    itc_model.eval()
    with torch.no_grad():
        emb = embed_dataset(itc_model, split.ds, cache_dir)
    split.attach_itc(emb["image_embeds"], emb["text_embeds"])
    return split


def make_split(model: FusionMatcher, ds: Dataset, grid: Any, cache_dir: str | Path | None = None,
               device: torch.device | str | None = None, itc_model: Any = None) -> FusionSplit:
    """``ds`` as ``model`` reads it: its own tokens, or (``word_features=minilm``) the captions'
    cached MiniLM states, computed when missing on ``device`` (default the model's); with
    ``itc_model`` (the re-ranker's frozen first stage, :func:`load_itc_run`) its embeddings attached."""
    dev = model_device(model) if device is None else device
    if getattr(model, "uses_word_states", False):
        states = caption_states(ds.texts, cache_dir, model.options.prefix_dtype, device=dev,
                                text_trainable=model.options.text_trainable)
        split = FusionSplit(ds, grid, None, word_states=states)
    else:
        split = FusionSplit(ds, grid, model.prepare_texts)
    if itc_model is not None:
        attach_itc_run(split, itc_model, cache_dir, dev)
    return split


def open_split(model: FusionMatcher, ds: Dataset, grid_store: str, cache_dir: str | Path | None = None,
               dataset: Dataset | None = None) -> FusionSplit:
    """``ds`` (a split of ``dataset``) with its grid rows; a re-ranker with ``model.itc_run`` gets its
    first stage's embeddings (the run checked against ``dataset``)."""
    from itrkit.teachers.grid import open_grid_store

    run = itc_run_of(model)
    itc_model = load_itc_run(run, dataset if dataset is not None else ds) if run else None
    return make_split(model, ds, open_grid_store(grid_store, ds.image_ids, source=ds.name), cache_dir,
                      itc_model=itc_model)


def run_scores(run: str | Path, data: str | Path | None = None, split: str = "test", grid_store: str | None = None,
               max_images: int = 0, progress: bool = True, device: str | torch.device = "auto",
               cache_dir: str | Path | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The (images × captions) scores of a trained run's selected model on a split (cached in the run),
    computed on ``device``; ``cache_dir`` (default: the run's) holds MiniLM caption states."""
    from itrkit.models.io import load_fusion_model

    run = Path(run)
    ds, grid_store, _ = _run_inputs(run, data, split, grid_store, max_images)
    path = run / f"scores_{split}.safetensors"
    cached = load_scores(path, ds, split, grid_store)
    if cached is not None:
        return cached, ds.txt2img
    model, _ = load_fusion_model(run)
    model.to(resolve_device(device))
    if is_reranker(model):
        raise ConfigError(f"{run}: a re-ranker has no full score matrix to ensemble; evaluate it alone")
    s = split_scores(model, open_split(model, ds, grid_store, _run_cache_dir(run, cache_dir)), progress=progress)
    save_scores(s, path, ds, split, grid_store)
    return s, ds.txt2img


# The protocols a fusion run or ensemble is evaluated with (itrkit.eval.protocols.PROTOCOLS are the
# dual encoders'): the others only select or fold images, which score matrices are not cut for.
FUSION_PROTOCOLS = ("full", "flickr8k-human")


def evaluate_fusion_runs(runs: list[str | Path], data: str | Path | None = None, split: str = "test",
                         grid_store: str | None = None, max_images: int = 0, progress: bool = True,
                         rerank_k: int | None = None, device: str | torch.device = "auto",
                         cache_dir: str | Path | None = None, itm_weight: float | None = None,
                         protocol: str = "full", annotations_dir: str | Path | None = None) -> dict[str, float]:
    """Metrics of one fusion run, or of the mean score matrix of several (SGRAF = SGR + SAF).

    A re-ranker run is evaluated alone by its protocol (``rerank_k``: candidates re-scored per
    query, default the run's own; 0 = its first stage alone; ``itm_weight``: w of the final score
    ``itc + w · itm``, default the run's own), with the ``itc_*`` (and, w finite, ``itm_only_*``)
    metrics beside; with ``model.itc_run`` the first stage is that dual-encoder run.
    ``cache_dir``: where MiniLM caption states are cached (``word_features=minilm``; default each
    run's own ``cache_dir``, else the default cache). ``protocol="flickr8k-human"`` adds the
    Flickr8k human-judgment metrics (:func:`fusion_human_metrics`) computed from the same scores;
    ``annotations_dir`` defaults to the folder found beside the images.
    """
    if protocol not in FUSION_PROTOCOLS:
        raise ConfigError(f"fusion runs and ensembles are evaluated with the {' or '.join(FUSION_PROTOCOLS)} "
                          f"protocol only, not '{protocol}'")
    metrics, human = _evaluate_runs(runs, data, split, grid_store, max_images, progress, rerank_k, device,
                                    cache_dir, itm_weight, protocol == "flickr8k-human", annotations_dir)
    return {**metrics, **(human or {})}


def fusion_human_metrics(runs: list[str | Path], data: str | Path | None = None, split: str = "test",
                         grid_store: str | None = None, max_images: int = 0, progress: bool = True,
                         rerank_k: int | None = None, device: str | torch.device = "auto",
                         cache_dir: str | Path | None = None, itm_weight: float | None = None,
                         annotations_dir: str | Path | None = None) -> dict[str, float]:
    """Only the Flickr8k human-judgment keys (the six metrics and the info keys of
    :func:`itrkit.eval.flickr8k_human.evaluate_flickr8k_human_scores`) of fusion runs on a split.

    One run ranks by its score matrix, several by their mean (the ensemble), and each τ uses that
    matrix's score of the pair; a re-ranker by its final rankings of each direction and its final
    pair score (:func:`rerank_scores`; ``rerank_k`` / ``itm_weight`` default to the run's own).
    Image names and caption ids come from the split's records
    (:func:`itrkit.eval.protocols.flickr8k_names`), the annotation folder from ``annotations_dir``
    or beside the images. Other arguments as :func:`evaluate_fusion_runs`.
    """
    _, human = _evaluate_runs(runs, data, split, grid_store, max_images, progress, rerank_k, device, cache_dir,
                              itm_weight, True, annotations_dir)
    assert human is not None
    return human


def _evaluate_runs(runs: list[str | Path], data: str | Path | None, split: str, grid_store: str | None,
                   max_images: int, progress: bool, rerank_k: int | None, device: str | torch.device,
                   cache_dir: str | Path | None, itm_weight: float | None, human: bool,
                   annotations_dir: str | Path | None) -> tuple[dict[str, float], dict[str, float] | None]:
    """(retrieval metrics, human-judgment metrics or None) of :func:`evaluate_fusion_runs`, from one
    scoring: the annotation folder and ids are checked before any model runs."""
    from itrkit.eval.flickr8k_human import evaluate_flickr8k_human_scores
    from itrkit.models.io import load_fusion_model

    if not runs:
        raise ConfigError("evaluating fusion runs needs at least one run folder")
    device = resolve_device(device)  # before any score matrix is written into a run
    ann, inputs = None, None
    if human:
        inputs = _run_inputs(Path(runs[0]), data, split, grid_store, max_images)
        ann = human_annotations(inputs[0], annotations_dir)
    if len(runs) == 1:
        model, _ = load_fusion_model(Path(runs[0]))
        if is_reranker(model):
            model.to(device)
            ds, grid, full = inputs or _run_inputs(Path(runs[0]), data, split, grid_store, max_images)
            fsplit = open_split(model, ds, grid, _run_cache_dir(Path(runs[0]), cache_dir), dataset=full)
            if ann is None:
                return split_metrics(model, fsplit, progress=progress, rerank_k=rerank_k, itm_weight=itm_weight)[0], None
            return _split_human(model, fsplit, ann, progress, rerank_k, itm_weight)
    mats, t2i = [], None
    for r in runs:
        s, t2i = run_scores(r, data, split, grid_store, max_images, progress, device=device, cache_dir=cache_dir)
        mats.append(s)
    scores = ensemble_scores(*mats)
    metrics = metrics_from_scores(scores, t2i)
    if ann is None:
        return metrics, None
    return metrics, evaluate_flickr8k_human_scores(scores, ann[0], ann[1], ann[2])
