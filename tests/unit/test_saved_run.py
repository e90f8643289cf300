"""A saved run read back on a machine without the attention kernel it was trained with:
`lmjax eval` and `lmjax generate` run `auto` instead, with one log line, and give the numbers
of the same run saved with model.attention=xla."""

import dataclasses

import numpy as np
import pytest

from lmjax.commands import evaluate as eval_command, generate as generate_command
from lmjax.config import Config, DataConfig
from lmjax.inference import saved_run
from tests.configs import SMALL_LM
from tests.helpers import random_model


@pytest.fixture(scope="module")
def params():
    return random_model(SMALL_LM, seed=2)[0]


def _saved_as(monkeypatch, config: Config, params, tokenizer) -> list:
    """Makes `saved_run.load` read `config` and `params` as a checkpoint's, and `tokenizer` as
    its tokenizer; returns the list of workdirs read."""
    reads = []

    def load_params(workdir, step):
        reads.append(workdir)
        return config, params, "tokenizer.model"

    monkeypatch.setattr(saved_run.listing, "load_params", load_params)
    monkeypatch.setattr(saved_run.tokenizer_lib, "load_tokenizer", lambda path: tokenizer)
    return reads


def _batch(seq_len: int) -> dict:
    seq = np.random.default_rng(5).integers(0, SMALL_LM.vocab_size, (8, seq_len + 1))
    return dict(
        inputs=seq[:, :-1],
        targets=seq[:, 1:],
        segment_ids=np.ones((8, seq_len), int),
        positions=np.tile(np.arange(seq_len), (8, 1)),
        loss_mask=np.ones((8, seq_len), np.float32),
    )


def _eval_and_generate(attention: str, monkeypatch, params, tokenizer):
    config = Config(
        model=dataclasses.replace(SMALL_LM, attention=attention), data=DataConfig(seq_len=32)
    )
    reads = _saved_as(monkeypatch, config, params, tokenizer)
    batch = _batch(32)
    loss = eval_command.main(
        "run", None, use_experiment_data=True, batches_for=lambda cfg, tok, workdir: [batch]
    )
    texts = generate_command.main("run", None, ["the king", "to be or not"], 6)
    assert reads == ["run", "run"]
    return loss, texts


def test_a_kernel_this_platform_lacks_runs_as_auto_offline(monkeypatch, params, tokenizer, caplog):
    with caplog.at_level("INFO", logger="lmjax"):
        loss, texts = _eval_and_generate("splash", monkeypatch, params, tokenizer)
    said = [m for m in caplog.messages if "model.attention=splash runs only on tpu" in m]
    assert len(said) == 2 and "model.attention=auto (xla here)" in said[0]  # one per load
    caplog.clear()
    with caplog.at_level("INFO", logger="lmjax"):
        want_loss, want_texts = _eval_and_generate("xla", monkeypatch, params, tokenizer)
    assert not [m for m in caplog.messages if "runs only on" in m]
    assert texts == want_texts
    assert loss == pytest.approx(want_loss, rel=1e-6)


def test_runnable_here_keeps_what_the_platform_runs():
    config = Config(model=dataclasses.replace(SMALL_LM, attention="splash"))
    assert saved_run.runnable_here(config, "tpu") is config
    for impl in ("pallas_gpu", "cudnn"):
        on_gpu = Config(model=dataclasses.replace(SMALL_LM, attention=impl))
        assert saved_run.runnable_here(on_gpu, "gpu") is on_gpu
        assert saved_run.runnable_here(on_gpu, "tpu").model.attention == "auto"
    for impl in ("xla", "auto"):
        kept = Config(model=dataclasses.replace(SMALL_LM, attention=impl))
        assert saved_run.runnable_here(kept, "cpu") is kept
    assert saved_run.runnable_here(config, "cpu").model == dataclasses.replace(
        SMALL_LM, attention="auto"
    )
