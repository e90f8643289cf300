"""Config overrides, validation messages and serialization."""

import dataclasses
import os

import pytest

from lmjax import cli, storage
from lmjax.commands.experiment import experiment_names, load_experiment
from lmjax.config import Config, ConfigError, diff, from_dict, to_dict, to_json
from lmjax.config_checks import validate
from lmjax.config_overrides import apply_overrides
from tests.helpers import REPO


def test_overrides_parse_to_field_types():
    c = apply_overrides(
        Config(),
        [
            "run.steps=50",
            "optim.lr=1e-3",
            "model.tie_embeddings=true",
            "model.dtype=float32",
            "mesh.rules=mlp=fsdp,embed=tensor",
            "run.steps=60",
        ],
    )
    assert c.run.steps == 60 and isinstance(c.run.steps, int)
    assert c.optim.lr == 1e-3 and c.model.tie_embeddings is True
    assert c.mesh.rules == ("mlp=fsdp", "embed=tensor")


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("run.stepz=3", "Did you mean 'steps'"),
        ("rum.steps=3", "Did you mean 'run'"),
        ("run.steps=1.5", "expected an integer"),
        ("model.tie_embeddings=maybe", "expected a boolean"),
        ("optim.lr=fast", "expected a number"),
        ("steps", "expected section.field=value"),
    ],
)
def test_bad_overrides_name_the_fix(item, fragment):
    with pytest.raises(ConfigError, match=fragment):
        apply_overrides(Config(), [item])


def test_unknown_field_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), ["data.sequence_length=4"])
    assert "data.seq_len" in str(e.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.n_heads=6", "model.n_kv_heads=4"], "divisible by model.n_kv_heads"),
        (["model.head_dim=63"], "must be even"),
        (["data.batch_size=6", "optim.grad_accum=4"], "divisible by optim.grad_accum"),
        (["data.seq_len=4096"], "exceeds model.max_seq_len"),
        (["model.remat=some"], "choose one of"),
        (["data.source=tfds"], "needs data.tfds_name"),
    ],
)
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
    names = experiment_names()
    for required in (
        "smoke",
        "quickstart",
        "bench_512",
        "llama_125m",
        "llama_1b",
        "llama2_7b",
        "llama3_8b",
        "llama3_70b",
        "qwen3_8b",
        "mistral_7b",
        "gemma3_12b",
    ):
        assert required in names
    for name in names:
        load_experiment(name)


GOLDEN = REPO / "tests" / "golden"


@pytest.mark.parametrize("name", experiment_names())
def test_every_preset_resolves_to_its_golden_config(name):
    """A change of a preset's resolved config shows in review as a change of
    tests/golden/NAME.json; `LMJAX_UPDATE_GOLDEN=1 pytest tests/unit/test_config.py` rewrites them."""
    resolved = to_json(load_experiment(name)) + "\n"
    golden = GOLDEN / f"{name}.json"
    if os.environ.get("LMJAX_UPDATE_GOLDEN") == "1":
        golden.write_text(resolved)
    assert golden.is_file(), f"no {golden}: run LMJAX_UPDATE_GOLDEN=1 pytest {__file__}"
    assert resolved == golden.read_text(), (
        f"preset {name!r} resolves to a config other than {golden.name}: review the change, then "
        f"LMJAX_UPDATE_GOLDEN=1 pytest {__file__}"
    )


def test_unknown_experiment_names_known_ones():
    with pytest.raises(ConfigError, match="known: .*smoke"):
        load_experiment("smokey")


def test_an_experiment_file_loads_from_a_local_or_gs_path(storage_root):
    """`--experiment PATH.py` on a local disk or in a bucket gives the same Config; a missing
    file names itself, as given (a gs:// path is not mangled into a local one)."""
    storage.path(storage_root).mkdir(parents=True, exist_ok=True)
    exp = storage.join(storage_root, "my_exp.py")
    storage.path(exp).write_text(
        "from lmjax.config import Config, RunConfig\n"
        "def config():\n    return Config(run=RunConfig(steps=7))\n"
    )
    assert load_experiment(exp, ["run.log_every=3"]).run.steps == 7
    missing = storage.join(storage_root, "nope.py")
    with pytest.raises(ConfigError, match=f"experiment file '{missing}' does not exist"):
        load_experiment(missing)


def test_cli_reports_config_error_with_exit_2(capsys):
    assert cli.main(["bench", "--experiment", "smoke", "--set", "model.head_dim=3"]) == 2
    assert "head_dim" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["run.eval_every=-1"], "run.eval_every=-1 must be 0"),
        (["checkpoint.every_steps=0"], "checkpoint.every_steps=0 must be at least 1"),
        (["run.eval_batches=0"], "run.eval_batches=0 must be at least 1"),
        (["run.sample_tokens=5000"], "run.sample_tokens=5000 must lie in"),
        (["optim.warmup_steps=-5"], "optim.warmup_steps=-5 must not be negative"),
        (["checkpoint.keep_every=-1"], "checkpoint.keep_every=-1 must be 0"),
        (["optim.wsd_decay_fraction=1.5"], r"optim.wsd_decay_fraction=1.5 must lie in \(0, 1\]"),
        (["optim.wsd_decay_fraction=0"], "optim.wsd_decay_fraction=0.0 must lie in"),
        (
            ["data.tokenizer_vocab_size=40000"],
            "data.tokenizer_vocab_size=40000 exceeds model.vocab_size",
        ),
        (["optim.b2=1"], "optim.b2=1.0 must lie in"),
        (["optim.eps=0"], "optim.eps=0.0 must be positive"),
        (["optim.lr=nan"], "optim.lr=nan must be a finite number"),
        (["mesh.data=0"], "mesh sizes"),
        (["mesh.fsdp=-1", "mesh.tensor=-1"], "at most one -1"),
        (["mesh.rules=mlp"], "mesh.rules entry 'mlp'"),
        (["model.rope_scaling_factor=8", "model.rope_low_freq_factor=4"], "0 < low < high"),
        (["data.validation_fraction=1"], "data.validation_fraction=1.0 must lie in"),
        (["checkpoint.every_minutes=-1"], "checkpoint.every_minutes=-1.0"),
        (["model.norm_eps=0"], "model.norm_eps must be positive"),
    ],
)
def test_every_invalid_value_names_its_field(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate(apply_overrides(Config(), overrides))


def test_a_wrong_type_from_an_experiment_file_names_the_field():
    config = dataclasses.replace(Config(), run=dataclasses.replace(Config().run, steps="100"))
    with pytest.raises(ConfigError, match="run.steps='100' must be an integer"):
        validate(config)


def test_what_needs_the_tokenizer_is_checked_once_it_is_known():
    from lmjax.config_checks import validate_tokenizer

    config = apply_overrides(
        Config(),
        [
            "model.vocab_size=1000",
            "model.max_seq_len=64",
            "data.seq_len=64",
            "run.sample_tokens=60",
        ],
    )
    validate_tokenizer(config, 1000, 4)
    with pytest.raises(ConfigError, match="1200 ids but model.vocab_size=1000"):
        validate_tokenizer(config, 1200, 4)
    with pytest.raises(ConfigError, match=r"run.sample_prompt \(5 tokens\)"):
        validate_tokenizer(config, 1000, 5)
    with pytest.raises(ConfigError, match="no BOS id"):
        validate_tokenizer(config, 1000, 0)
