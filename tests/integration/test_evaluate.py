"""Evaluation against the independent float64 numpy Llama (tests/numpy_llama.py).

A tiny sentencepiece model is trained once per session on a slice of Hamlet (the `tokenizer`
fixture of tests/conftest.py); the texts scored are from other plays.
"""

import json

import jax
import numpy as np
import pytest

from lmjax.checkpoint import checkpointer, compat, paths
from lmjax.commands import evaluate as eval_command
from lmjax.config import Config, DataConfig, RunConfig
from lmjax.data import pipeline
from lmjax.inference import evaluate
from lmjax.parallel import sharding
from lmjax.train import trainer
from tests.configs import SMALL_LM as CFG
from tests.unit import test_evaluate as fast_tier
from tests.unit.test_evaluate import passages

# The fast tier's module-scoped fixtures these tests share (pytest finds a fixture by the
# module attribute that holds it).
model_and_ref = fast_tier.model_and_ref


def test_main_evaluates_a_saved_checkpoint(model_and_ref, tmp_path, tokenizer, capsys):
    """The default loader on a real orbax checkpoint with the run's tokenizer.model."""
    params = model_and_ref[0]
    config = Config(
        model=CFG,
        data=DataConfig(source="synthetic", batch_size=8, seq_len=16),
        run=RunConfig(eval_batches=2),
    )
    state = trainer.TrainState(
        step=np.int32(5), params=params, opt_state={}, rng=jax.random.PRNGKey(0)
    )
    mesh = sharding.make_mesh(config.mesh)
    ckpt = checkpointer.Checkpointer(paths.checkpoint_dir(str(tmp_path)), config.checkpoint)
    ckpt.save(5, state, data_state={}, meta=compat.make_metadata(config, None, mesh))
    ckpt.close()
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.serialized)
    text = passages(200, 1)[0]
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")

    result = eval_command.main(str(tmp_path), 5, [str(tmp_path / "doc.txt")], as_json=True)
    assert json.loads(capsys.readouterr().out) == result
    expected = evaluate.score_texts(params, CFG, tokenizer, [text], context_len=16, stride=8)
    assert result == pytest.approx({**expected, "files": 1}, rel=1e-5)

    result = eval_command.main(str(tmp_path), None, use_experiment_data=True)
    batches = pipeline.make_pipeline(config.data, None, vocab_size=CFG.vocab_size).eval_batches(2)
    assert result == pytest.approx(evaluate.eval_loss(params, CFG, batches), rel=1e-5)
    assert result["tokens"] == 2 * 8 * 16
