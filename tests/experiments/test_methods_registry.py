"""Contract over every ``itrkit reproduce`` method: its recipe or ensemble resolves to bundled
configs that load, so a method name in ``--methods`` never fails only at its turn in a long run."""

from __future__ import annotations

import pytest

from itrkit.experiments.methods import METHODS


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_resolves(name: str) -> None:
    from itrkit.train.config import load_train_config, resolve_config

    method = METHODS[name]
    assert method.kind in {"tuned", "recipe", "ensemble"}
    if method.kind == "recipe":
        cfg = load_train_config(resolve_config(method.recipe), [])  # unknown keys raise here
        assert (cfg.teacher.image_store == "") and (cfg.teacher.text_store == "")  # the runner supplies them
        assert method.teachers == (cfg.loss.csa > 0 or cfg.loss.usa > 0 or cfg.loss.soft_itm > 0)
        if method.first_stage:
            assert METHODS[method.first_stage].kind == "tuned" and cfg.model.itc_run == ""
    elif method.kind == "ensemble":
        assert len(method.members) == 2 and all(METHODS[m].kind == "recipe" for m in method.members)
        assert len({METHODS[m].teachers for m in method.members}) == 1  # both halves with CUSA or neither


def test_minilm_matchers_read_token_states() -> None:
    from itrkit.train.config import load_train_config, resolve_config

    for name in ("sgr-minilm", "saf-minilm", "sgr-minilm+cusa", "saf-minilm+cusa"):
        cfg = load_train_config(resolve_config(METHODS[name].recipe), [])
        assert cfg.model.word_features == "minilm" and cfg.model.name == name.split("-")[0]
        assert cfg.loss.sum_warmup_epochs >= cfg.stages[0].epochs  # the sum hinge for the whole run
    assert METHODS["sgraf-minilm+cusa"].members == ("sgr-minilm+cusa", "saf-minilm+cusa")
