"""Config overrides, validation messages and serialization."""
import dataclasses

import pytest

from lmjax import cli
from lmjax.config import Config, ConfigError, apply_overrides, diff, from_dict, to_dict, validate


def test_overrides_parse_to_field_types():
    c = apply_overrides(Config(), ["run.steps=50", "optim.lr=1e-3", "model.tie_embeddings=true",
                                   "model.dtype=float32", "mesh.rules=mlp=fsdp,embed=tensor",
                                   "run.steps=60"])
    assert c.run.steps == 60 and isinstance(c.run.steps, int)
    assert c.optim.lr == 1e-3 and c.model.tie_embeddings is True
    assert c.mesh.rules == ("mlp=fsdp", "embed=tensor")


@pytest.mark.parametrize("item, fragment", [
    ("run.stepz=3", "Did you mean 'steps'"),
    ("rum.steps=3", "Did you mean 'run'"),
    ("run.steps=1.5", "expected an integer"),
    ("model.tie_embeddings=maybe", "expected a boolean"),
    ("optim.lr=fast", "expected a number"),
    ("steps", "expected section.field=value"),
])
def test_bad_overrides_name_the_fix(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides(Config(), [item])


def test_unknown_field_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), ["data.sequence_length=4"])
    assert "data.seq_len" in str(e.value)


@pytest.mark.parametrize("overrides, fragment", [
    (["model.n_heads=6", "model.n_kv_heads=4"], "divisible by model.n_kv_heads"),
    (["model.head_dim=63"], "must be even"),
    (["data.batch_size=6", "optim.grad_accum=4"], "divisible by optim.grad_accum"),
    (["data.seq_len=4096"], "exceeds model.max_seq_len"),
    (["model.remat=some"], "choose one of"),
    (["data.source=tfds"], "needs data.tfds_name"),
])
def test_validation_messages(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate(apply_overrides(Config(), overrides))


def test_validation_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        validate(apply_overrides(Config(), ["model.head_dim=63", "run.steps=0"]))
    assert "head_dim" in str(e.value) and "run.steps" in str(e.value)


def test_round_trip_and_diff():
    c = apply_overrides(Config(), ["mesh.rules=mlp=fsdp", "run.steps=7"])
    assert from_dict(to_dict(c)) == c
    d = diff(c, dataclasses.replace(c, run=dataclasses.replace(c.run, steps=8)))
    assert d == {"run.steps": (7, 8)}


def test_every_experiment_loads_and_validates():
    names = cli.experiment_names()
    for required in ("smoke", "quickstart", "bench_512", "llama_125m", "llama_1b", "llama2_7b",
                     "llama3_8b", "llama3_70b"):
        assert required in names
    for name in names:
        cli.load_experiment(name)


def test_unknown_experiment_names_known_ones():
    with pytest.raises(ConfigError, match="known: .*smoke"):
        cli.load_experiment("smokey")


def test_cli_reports_config_error_with_exit_2(capsys):
    assert cli.main(["bench", "--experiment", "smoke", "--set", "model.head_dim=3"]) == 2
    assert "head_dim" in capsys.readouterr().err
