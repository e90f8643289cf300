"""Evaluation against the independent float64 numpy Llama (tests/numpy_llama.py).

A tiny sentencepiece model is trained once per session on a slice of Hamlet (the `tokenizer`
fixture of tests/conftest.py); the texts scored are from other plays.
"""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from lmjax.commands import evaluate as eval_command
from lmjax.config import Config, ConfigError, DataConfig, MeshConfig
from lmjax.data.documents import PACKAGED_DIR
from lmjax.inference import evaluate
from lmjax.model import transformer
from lmjax.parallel import sharding
from tests import numpy_llama
from tests.configs import SMALL_LM as CFG
from tests.helpers import hf_config, random_model

# The Shakespeare slice shipped inside the package, so a fresh clone needs nothing beside it.
CORPUS = PACKAGED_DIR


@pytest.fixture(scope="module")
def model_and_ref():
    params, tensors = random_model(CFG, seed=1)
    return params, tensors, hf_config(CFG)


def passages(n_chars: int, count: int) -> list[str]:
    """Non-empty, non-ASCII-free (curly quotes added) passages from Macbeth."""
    with open(f"{CORPUS}/macbeth.txt", encoding="utf-8") as f:
        text = f.read()[5000:]
    out = [text[i * n_chars : (i + 1) * n_chars] for i in range(count)]
    out[0] = "\u201cThus\u201d \u2014 " + out[0]  # multi-byte UTF-8 characters
    return out


def log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def reference_target_nll(tensors, config, inputs, targets):
    """Per-target NLL [n] of one unpadded window, from the numpy model."""
    logp = log_softmax64(numpy_llama.forward(tensors, config, np.asarray([inputs]))[0])
    return -logp[np.arange(len(targets)), targets]


@pytest.mark.parametrize(
    "n,context_len,stride",
    [(0, 8, 4), (1, 8, 4), (8, 8, 3), (9, 8, 3), (50, 8, 3), (50, 8, 8), (50, 8, 1), (23, 16, 5)],
)
def test_sliding_windows_score_every_target_once_with_most_context(n, context_len, stride):
    windows = evaluate.sliding_windows(n, context_len, stride)
    scored = [i for _, first, end in windows for i in range(first, end)]
    assert scored == list(range(n))
    for k, (start, first, end) in enumerate(windows):
        assert end - start <= context_len
        assert start == max(0, end - context_len)  # as much left context as fits
        assert end - first == (min(n, context_len) if k == 0 else min(stride, n - first))


def test_sliding_windows_reject_bad_stride():
    for stride in (0, 9):
        with pytest.raises(ValueError, match="stride"):
            evaluate.sliding_windows(10, 8, stride)


def test_eval_loss_matches_numpy_per_document(model_and_ref):
    """Packed rows (two documents with restarting positions) and a partial loss mask."""
    params, tensors, config = model_and_ref
    rng = np.random.default_rng(0)
    batches, ref_nll, ref_tokens = [], 0.0, 0
    for _ in range(2):
        seq = rng.integers(0, CFG.vocab_size, (2, 17))
        inputs, targets = seq[:, :-1], seq[:, 1:]
        segment_ids = np.array([[1] * 10 + [2] * 6, [1] * 16])
        positions = np.array([list(range(10)) + list(range(6)), list(range(16))])
        loss_mask = (rng.random((2, 16)) < 0.7).astype(np.float32)
        batches.append(
            dict(
                inputs=inputs,
                targets=targets,
                segment_ids=segment_ids,
                positions=positions,
                loss_mask=loss_mask,
            )
        )
        for b in range(2):
            for seg in np.unique(segment_ids[b]):
                idx = np.flatnonzero(segment_ids[b] == seg)
                nll = reference_target_nll(tensors, config, inputs[b, idx], targets[b, idx])
                ref_nll += float((nll * loss_mask[b, idx]).sum())
                ref_tokens += int(loss_mask[b, idx].sum())
    result = evaluate.eval_loss(params, CFG, batches)
    assert result["tokens"] == ref_tokens
    np.testing.assert_allclose(result["loss"], ref_nll / ref_tokens, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], math.exp(ref_nll / ref_tokens), rtol=1e-5)


def test_eval_loss_errors_name_the_problem(model_and_ref):
    params = model_and_ref[0]
    batch = dict(inputs=np.zeros((1, 4), int), targets=np.zeros((1, 4), int))
    with pytest.raises(ValueError, match="lacks"):
        evaluate.eval_loss(params, CFG, [batch])
    full = dict(
        batch,
        segment_ids=np.ones((1, 4), int),
        positions=np.zeros((1, 4), int),
        loss_mask=np.zeros((1, 4), np.float32),
    )
    with pytest.raises(ValueError, match="no tokens"):
        evaluate.eval_loss(params, CFG, [full])


def test_score_texts_matches_numpy_full_context(model_and_ref, tokenizer):
    """Documents that fit: BOS is context, every text token is a target, EOS is not."""
    params, tensors, config = model_and_ref
    texts = passages(60, 3) + [""]
    docs = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
    assert 1 < max(len(d) for d in docs) <= CFG.max_seq_len
    total = sum(
        float(reference_target_nll(tensors, config, d[:-1], d[1:]).sum())
        for d in docs
        if len(d) > 1
    )
    n_tokens = sum(len(d) - 1 for d in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert n_bytes > sum(len(t) for t in texts)  # the multi-byte characters count as bytes

    result = evaluate.score_texts(
        params, CFG, tokenizer, texts, context_len=64, stride=7, batch_size=2
    )
    assert result["tokens"] == n_tokens and result["bytes"] == n_bytes
    np.testing.assert_allclose(result["loss"], total / n_tokens, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], math.exp(total / n_tokens), rtol=1e-5)
    np.testing.assert_allclose(result["bits_per_byte"], total / math.log(2) / n_bytes, rtol=1e-5)


def test_score_texts_sliding_window_matches_naive_loop(model_and_ref, tokenizer):
    """A long document, context 16, stride 5: target i is scored once, in the window that
    ends at the first multiple-of-stride boundary past it, with 16 inputs of context."""
    params, tensors, config = model_and_ref
    text = passages(300, 1)[0]
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    n, context_len, stride = len(ids) - 1, 16, 5
    assert n > 3 * context_len
    total = 0.0
    for i in range(n):
        end = (
            context_len
            if i < context_len
            else min(n, context_len + stride * math.ceil((i + 1 - context_len) / stride))
        )
        start = max(0, end - context_len)
        nll = reference_target_nll(tensors, config, ids[start:end], ids[start + 1 : end + 1])
        total += float(nll[i - start])
    result = evaluate.score_texts(
        params, CFG, tokenizer, [text], context_len=context_len, stride=stride, batch_size=4
    )
    assert result["tokens"] == n
    np.testing.assert_allclose(result["loss"] * n, total, rtol=1e-5)
    # With a window as long as the document, stride no longer matters.
    assert len(tokenizer.encode(text[:50])) < 64
    wide = [
        evaluate.score_texts(params, CFG, tokenizer, [text[:50]], context_len=64, stride=s)
        for s in (3, 64)
    ]
    assert wide[0] == wide[1]


def test_score_texts_rejects_bad_arguments_before_scoring(model_and_ref, tokenizer):
    params = model_and_ref[0]
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate.score_texts(params, CFG, tokenizer, ["a"], context_len=65, stride=4)
    with pytest.raises(ValueError, match="stride"):
        evaluate.score_texts(params, CFG, tokenizer, ["a"], context_len=16, stride=0)
    small = dataclasses.replace(CFG, vocab_size=100)
    with pytest.raises(ValueError, match="does not match"):
        evaluate.score_texts(params, small, tokenizer, ["the king"], context_len=16, stride=4)


def test_main_scores_text_files_and_experiment_data(model_and_ref, tokenizer, tmp_path, capsys):
    params = model_and_ref[0]
    config = Config(model=CFG, data=DataConfig(seq_len=32))
    texts = passages(200, 2)
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t, encoding="utf-8")
    loads = []

    def load(workdir, step):
        loads.append((workdir, step))
        return config, params, tokenizer

    result = eval_command.main("run_dir", 7, [str(tmp_path / "*.txt")], as_json=True, load=load)
    assert loads == [("run_dir", 7)]
    assert json.loads(capsys.readouterr().out) == result
    expected = evaluate.score_texts(params, CFG, tokenizer, texts, context_len=32, stride=16)
    # The command computes on the offline mesh (8 devices here): sums in another order.
    assert result == pytest.approx({**expected, "files": 2}, rel=1e-5)

    rng = np.random.default_rng(3)
    seq = rng.integers(0, CFG.vocab_size, (2, 9))
    batch = dict(
        inputs=seq[:, :-1],
        targets=seq[:, 1:],
        segment_ids=np.ones((2, 8), int),
        positions=np.tile(np.arange(8), (2, 1)),
        loss_mask=np.ones((2, 8), np.float32),
    )
    result = eval_command.main(
        "run_dir",
        None,
        use_experiment_data=True,
        load=load,
        batches_for=lambda cfg, tok, workdir: [batch],
    )
    assert result == pytest.approx(evaluate.eval_loss(params, CFG, [batch]), rel=1e-5)
    assert "loss" in capsys.readouterr().out

    with pytest.raises(ValueError, match="--text-files"):
        eval_command.main("run_dir", None, load=load)
    with pytest.raises(ConfigError, match="matched no files"):
        eval_command.main("run_dir", None, [str(tmp_path / "*.jsonl")], load=load)
    assert len(loads) == 2  # bad arguments fail before loading


def test_eval_loss_sharded_matches_unsharded(model_and_ref):
    params = model_and_ref[0]
    mesh_cfg = MeshConfig(data=1, fsdp=4, tensor=2)
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules_from_config(mesh_cfg)
    placed = jax.device_put(
        params, sharding.tree_shardings(transformer.param_axes(CFG), mesh, rules)
    )
    seq = np.random.default_rng(5).integers(0, CFG.vocab_size, (4, 17))
    batch = dict(
        inputs=seq[:, :-1],
        targets=seq[:, 1:],
        segment_ids=np.ones((4, 16), int),
        positions=np.tile(np.arange(16), (4, 1)),
        loss_mask=np.ones((4, 16), np.float32),
    )
    plain = evaluate.eval_loss(params, CFG, [batch])
    with sharding.activation_sharding(mesh, rules):
        sharded = evaluate.eval_loss(placed, CFG, [batch])
    assert sharded["tokens"] == plain["tokens"]
    np.testing.assert_allclose(sharded["loss"], plain["loss"], rtol=1e-6)
