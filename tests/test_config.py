"""pipelines.config: YAML + dotted overrides -> validated dataclasses, with errors that name the key."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import yaml

from pipelines.config import (
    CGANConfig,
    ConfigError,
    DataConfig,
    DDPMConfig,
    config_from_dict,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)


def write_yaml(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


CGAN_YAML = """\
    data:
      name: fashion_mnist
      limit: 12000
    model:
      arch: upsample_conv
      latent_dim: 64
      bn_eps: 0.8
    loss:
      name: wgan_gp
      critic_steps: 5
    optim:
      betas: [0.0, 0.9]
    train:
      batch_size: 64
      epochs: 3
      ema_decay: 0.999
    log:
      tags: [demo, cgan]
    output_dir: runs/test
    seed: 7
"""


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("old,new", [("report_a", "transposed_conv"), ("notes_e", "upsample_conv")])
def test_old_architecture_names_still_load_with_a_warning(old, new, tmp_path):
    with pytest.warns(FutureWarning, match=f"model.arch='{old}' is the old name of '{new}'"):
        cfg = load_config(CGANConfig, write_yaml(tmp_path, CGAN_YAML.replace("upsample_conv", old)))
    assert cfg.model.arch == new
    with pytest.warns(FutureWarning, match="old name"):
        assert load_config(CGANConfig, overrides=[f"model.arch={old}"]).model.arch == new


def test_load_yaml_into_cgan_config(tmp_path):
    cfg = load_config(CGANConfig, write_yaml(tmp_path, CGAN_YAML))
    assert isinstance(cfg, CGANConfig)
    assert cfg.data.name == "fashion_mnist" and cfg.data.limit == 12000
    assert cfg.model.arch == "upsample_conv" and cfg.model.latent_dim == 64 and cfg.model.bn_eps == 0.8
    assert cfg.loss.name == "wgan_gp" and cfg.loss.critic_steps == 5
    assert cfg.optim.betas == (0.0, 0.9) and isinstance(cfg.optim.betas, tuple)
    assert cfg.train.batch_size == 64 and cfg.train.epochs == 3 and cfg.train.ema_decay == 0.999
    assert cfg.log.tags == ["demo", "cgan"]
    assert cfg.output_dir == "runs/test" and cfg.seed == 7
    # keys absent from the file keep their defaults
    assert cfg.model.label_emb_dim == CGANConfig().model.label_emb_dim == 50
    assert cfg.loss.gp_weight == 10.0
    assert cfg.data.split == "train"


def test_load_yaml_into_ddpm_config(tmp_path):
    path = write_yaml(tmp_path, """\
        data: {name: cifar10, hflip: true}
        model:
          block_out_channels: [64, 128, 128, 256]
          attention: [false, false, true, true]
          norm_num_groups: 32
        diffusion: {prediction_type: v_prediction, snr_gamma: 5, beta_schedule: squaredcos_cap_v2}
        optim: {lr: 0.0001, schedule: onecycle}
        train: {gradient_accumulation_steps: 4}
    """)
    cfg = load_config(DDPMConfig, path)
    assert isinstance(cfg, DDPMConfig)
    assert cfg.data.name == "cifar10" and cfg.data.hflip is True
    assert cfg.model.block_out_channels == [64, 128, 128, 256]
    assert cfg.model.attention == [False, False, True, True]
    assert cfg.diffusion.prediction_type == "v_prediction"
    assert cfg.diffusion.snr_gamma == 5.0 and isinstance(cfg.diffusion.snr_gamma, float)  # int accepted for float
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.schedule == "onecycle"
    assert cfg.train.gradient_accumulation_steps == 4  # allowed for diffusion (only the cGAN forbids it)


def test_no_file_and_no_overrides_gives_defaults():
    assert load_config(CGANConfig) == CGANConfig()
    assert load_config(DDPMConfig) == DDPMConfig()


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(CGANConfig, write_yaml(tmp_path, "# nothing here\n")) == CGANConfig()


# ---------------------------------------------------------------- overrides


def test_dotted_overrides():
    cfg = load_config(CGANConfig, overrides=["train.epochs=30", "model.label_emb_dim=10", "seed=3"])
    assert cfg.train.epochs == 30
    assert cfg.model.label_emb_dim == 10
    assert cfg.seed == 3
    assert cfg.train.batch_size == CGANConfig().train.batch_size  # untouched siblings keep defaults


def test_override_list_value():
    cfg = load_config(CGANConfig, overrides=["data.classes=[3,5]"])
    assert cfg.data.classes == [3, 5]
    assert isinstance(cfg.data.classes, list)


def test_override_tuple_value_becomes_tuple_of_floats():
    cfg = load_config(CGANConfig, overrides=["optim.betas=[0.0,0.9]"])
    assert cfg.optim.betas == (0.0, 0.9)
    assert isinstance(cfg.optim.betas, tuple)
    cfg = load_config(CGANConfig, overrides=["optim.betas=[0, 0.9]"])  # int inside a float tuple
    assert cfg.optim.betas == (0.0, 0.9) and all(isinstance(b, float) for b in cfg.optim.betas)


def test_int_accepted_for_float():
    cfg = load_config(CGANConfig, overrides=["model.bn_momentum=1", "optim.lr_g=1"])
    assert cfg.model.bn_momentum == 1.0 and type(cfg.model.bn_momentum) is float
    assert cfg.optim.lr_g == 1.0 and type(cfg.optim.lr_g) is float


def test_null_for_optional(tmp_path):
    path = write_yaml(tmp_path, "train: {ema_decay: 0.999, max_steps: 100}\n")
    cfg = load_config(CGANConfig, path, ["train.ema_decay=null", "train.max_steps=~"])
    assert cfg.train.ema_decay is None
    assert cfg.train.max_steps is None


def test_null_rejected_for_non_optional():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(CGANConfig, overrides=["train.epochs=null"])


def test_override_beats_file_and_keeps_other_file_values(tmp_path):
    path = write_yaml(tmp_path, CGAN_YAML)
    cfg = load_config(CGANConfig, path, ["train.epochs=30", "loss.name=hinge", "optim.betas=[0.5,0.99]"])
    assert cfg.train.epochs == 30  # file says 3
    assert cfg.loss.name == "hinge"  # file says wgan_gp
    assert cfg.optim.betas == (0.5, 0.99)
    # the rest of the overridden sections still comes from the file
    assert cfg.train.batch_size == 64 and cfg.train.ema_decay == 0.999
    assert cfg.loss.critic_steps == 5


def test_later_override_of_same_key_wins():
    cfg = load_config(CGANConfig, overrides=["train.epochs=2", "train.epochs=9"])
    assert cfg.train.epochs == 9


def test_parse_overrides_nests_and_parses_yaml_values():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]", "f=true", "g="]) == {
        "a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2], "f": True, "g": ""}
    # only the first '=' splits: the value may contain '='
    assert parse_overrides(["output_dir=runs/a=b"]) == {"output_dir": "runs/a=b"}


# ---------------------------------------------------------------- errors


def test_unknown_top_level_key():
    with pytest.raises(ConfigError) as err:
        load_config(CGANConfig, overrides=["trian.epochs=3"])
    msg = str(err.value)
    assert "'trian'" in msg
    for key in ("data", "model", "loss", "optim", "train", "checkpoint", "log", "output_dir", "seed"):
        assert key in msg


def test_unknown_top_level_key_in_file(tmp_path):
    with pytest.raises(ConfigError, match="bogus"):
        load_config(DDPMConfig, write_yaml(tmp_path, "bogus: 1\n"))


def test_unknown_nested_key_lists_valid_keys_of_that_section():
    with pytest.raises(ConfigError) as err:
        load_config(CGANConfig, overrides=["train.epochz=3"])
    msg = str(err.value)
    assert "train.epochz" in msg
    assert "valid keys in train" in msg
    for key in ("batch_size", "epochs", "max_steps", "mixed_precision", "ema_decay"):
        assert key in msg
    assert "latent_dim" not in msg  # keys of other sections are not offered


def test_unknown_nested_key_depends_on_config_class():
    # `model.norm_num_groups` exists for the U-Net, not for the cGAN
    assert load_config(DDPMConfig, overrides=["model.norm_num_groups=16"]).model.norm_num_groups == 16
    with pytest.raises(ConfigError) as err:
        load_config(CGANConfig, overrides=["model.norm_num_groups=16"])
    assert "model.norm_num_groups" in str(err.value) and "latent_dim" in str(err.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=abc", "train.epochs='abc'"),  # string for int
        ("train.epochs=true", "train.epochs=True"),  # bool for int
        ("train.epochs=2.5", "train.epochs=2.5"),  # float for int
        ("train.batch_size=[1,2]", "train.batch_size"),  # list for int
        ("model.bn_momentum=fast", "model.bn_momentum"),  # string for float
        ("model.bn_momentum=true", "model.bn_momentum"),  # bool for float
        ("data.hflip=1", "data.hflip"),  # int for bool
        ("output_dir=5", "output_dir"),  # int for str
        ("data.classes=3", "data.classes"),  # scalar for list
        ("data.classes=[1,x]", "data.classes[1]"),  # wrong item type, indexed
        ("optim.betas=[0.5]", "optim.betas"),  # wrong tuple length
        ("train=5", "train"),  # scalar for a section
    ],
)
def test_wrong_type_names_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(CGANConfig, overrides=[override])
    assert expected in str(err.value)


def test_wrong_type_messages_say_what_was_expected():
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(CGANConfig, overrides=["train.epochs=abc"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(CGANConfig, overrides=["train.epochs=true"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(CGANConfig, overrides=["optim.lr_g=fast"])
    with pytest.raises(ConfigError, match="expected 2 values"):
        load_config(CGANConfig, overrides=["optim.betas=[0.5,0.9,0.99]"])


def test_wrong_type_in_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size='64'"):
        load_config(CGANConfig, write_yaml(tmp_path, "train:\n  batch_size: '64'\n"))


def test_invalid_choice_lists_valid_choices():
    with pytest.raises(ConfigError) as err:
        load_config(CGANConfig, overrides=["loss.name=foo"])
    msg = str(err.value)
    assert "loss.name='foo'" in msg
    assert "bce, wgan_gp, lsgan, hinge" in msg


@pytest.mark.parametrize(
    "cls, override, choices",
    [
        (CGANConfig, "data.name=mnist", ["fashion_mnist", "cifar10", "synthetic"]),
        (CGANConfig, "train.mixed_precision=fp8", ["no", "fp16", "bf16"]),
        (CGANConfig, "model.d_norm=layer", ["batch", "spectral"]),
        (DDPMConfig, "diffusion.prediction_type=sample", ["epsilon", "v_prediction"]),
        (DDPMConfig, "optim.schedule=linear", ["constant", "cosine", "onecycle"]),
    ],
)
def test_other_invalid_choices(cls, override, choices):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(cls, overrides=[override])
    msg = str(err.value)
    assert key in msg and "valid choices" in msg
    for choice in choices:
        assert choice in msg


def test_bare_no_means_no_mixed_precision(tmp_path):
    # YAML 1.1 reads `no` as false; the option's own spelling must still work, in a file and on the command line.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(DDPMConfig, path).train.mixed_precision == "no"
    assert load_config(DDPMConfig, overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="valid choices"):
        load_config(DDPMConfig, overrides=["train.mixed_precision=yes"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError) as err:
        load_config(CGANConfig, overrides=["train.epochs"])
    assert "'train.epochs'" in str(err.value) and "section.key=value" in str(err.value)


def test_override_with_empty_key():
    with pytest.raises(ConfigError, match="empty key"):
        load_config(CGANConfig, overrides=["train..epochs=3"])


def test_override_with_invalid_yaml_value():
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(CGANConfig, overrides=["data.classes=[1,2"])


def test_config_file_not_found(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(CGANConfig, missing)
    assert "not found" in str(err.value) and str(missing) in str(err.value)


def test_config_path_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(CGANConfig, tmp_path)


@pytest.mark.parametrize("text", ["- train\n- model\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path, text):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(CGANConfig, write_yaml(tmp_path, text))


def test_invalid_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(CGANConfig, write_yaml(tmp_path, "train: {epochs: 3\n"))


def test_config_error_is_a_value_error():
    # callers that catch ValueError (argparse-style) also catch config mistakes
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- cross-field and range validation


def test_unet_attention_length_must_match_levels():
    with pytest.raises(ConfigError) as err:
        load_config(DDPMConfig, overrides=["model.attention=[false,true]"])  # 3 levels by default
    msg = str(err.value)
    assert "model.attention" in msg and "2 entries" in msg and "(3)" in msg
    # the same list is fine once the levels match
    cfg = load_config(DDPMConfig, overrides=["model.attention=[false,true]", "model.block_out_channels=[32,64]"])
    assert cfg.model.attention == [False, True]


def test_unet_norm_groups_must_divide_channels():
    with pytest.raises(ConfigError) as err:
        load_config(DDPMConfig, overrides=["model.block_out_channels=[32,48,64]", "model.norm_num_groups=32"])
    msg = str(err.value)
    assert "model.norm_num_groups=32" in msg and "[48]" in msg
    assert load_config(DDPMConfig, overrides=["model.block_out_channels=[32,48,64]",
                                              "model.norm_num_groups=16"]).model.norm_num_groups == 16


def test_cgan_rejects_gradient_accumulation():
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        load_config(CGANConfig, overrides=["train.gradient_accumulation_steps=2"])
    assert load_config(DDPMConfig, overrides=["train.gradient_accumulation_steps=2"]).train.gradient_accumulation_steps == 2


@pytest.mark.parametrize("classes", ["[3,3]", "[1,2,1]", "[]"])
def test_data_classes_must_be_distinct_and_non_empty(classes):
    with pytest.raises(ConfigError, match=r"data\.classes"):
        load_config(CGANConfig, overrides=[f"data.classes={classes}"])


def test_data_config_validate_directly():
    with pytest.raises(ConfigError, match="distinct"):
        DataConfig(classes=[0, 0]).validate()
    DataConfig(classes=[0, 1]).validate()  # no error


@pytest.mark.parametrize(
    "cls, override, key",
    [
        (CGANConfig, "train.batch_size=0", "train.batch_size"),
        (CGANConfig, "train.max_steps=0", "train.max_steps"),
        (CGANConfig, "train.ema_decay=1.0", "train.ema_decay"),
        (CGANConfig, "model.bn_momentum=0", "model.bn_momentum"),
        (CGANConfig, "optim.betas=[0.5,1.0]", "optim.betas"),
        (CGANConfig, "optim.lr_d=-0.1", "optim.lr_d"),
        (CGANConfig, "loss.gp_weight=-1", "loss.gp_weight"),
        (CGANConfig, "data.limit=0", "data.limit"),
        (CGANConfig, "data.synthetic_channels=2", "data.synthetic_channels"),
        (CGANConfig, "checkpoint.every_minutes=0", "checkpoint.every_minutes"),
        (CGANConfig, "log.every_steps=0", "log.every_steps"),
        (DDPMConfig, "diffusion.label_dropout=1.0", "diffusion.label_dropout"),
        (DDPMConfig, "diffusion.snr_gamma=0", "diffusion.snr_gamma"),
        (DDPMConfig, "diffusion.sample_guidance_interval=[0.6,0.2]", "diffusion.sample_guidance_interval"),
        (DDPMConfig, "diffusion.sample_guidance_interval=[0,0.5,1]", "diffusion.sample_guidance_interval"),
        (DDPMConfig, "model.dropout=1.0", "model.dropout"),
        (DDPMConfig, "optim.lr=0", "optim.lr"),
    ],
)
def test_out_of_range_values(cls, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(cls, overrides=[override])
    assert key in str(err.value)


def test_config_from_dict_validates():
    cfg = config_from_dict(CGANConfig, {"train": {"epochs": 4}, "data": {"classes": [3, 5]}})
    assert cfg.train.epochs == 4 and cfg.data.classes == [3, 5]
    with pytest.raises(ConfigError):
        config_from_dict(CGANConfig, {"train": {"gradient_accumulation_steps": 3}})


# ---------------------------------------------------------------- to_dict / save_config


def test_to_dict_is_plain_nested_data():
    cfg = load_config(CGANConfig, overrides=["optim.betas=[0.0,0.9]", "data.classes=[3,5]"])
    d = to_dict(cfg)
    assert set(d) == {f.name for f in dataclasses.fields(CGANConfig)}
    assert d["optim"]["betas"] == [0.0, 0.9]  # tuples become lists
    assert d["data"]["classes"] == [3, 5]
    assert d["train"]["epochs"] == cfg.train.epochs
    # plain enough for yaml.safe_dump (which refuses tuples and dataclasses)
    assert yaml.safe_load(yaml.safe_dump(d)) == d
    # and it builds the same config back
    assert config_from_dict(CGANConfig, d) == cfg


@pytest.mark.parametrize(
    "cls, overrides",
    [
        (CGANConfig, ["optim.betas=[0.0,0.9]", "data.classes=[3,5]", "train.ema_decay=0.99",
                      "loss.name=wgan_gp", "model.bn_momentum=1", "log.tags=[a,b]", "checkpoint.every_minutes=2.5",
                      "data.path=/tmp/some data", "seed=11"]),
        (DDPMConfig, ["model.block_out_channels=[32,64]", "model.attention=[false,true]",
                      "diffusion.snr_gamma=5", "optim.max_grad_norm=null", "optim.betas=[0.95,0.999]",
                      "data.pad_to=32", "output_dir=runs/x y"]),
    ],
)
def test_save_config_round_trip(tmp_path, cls, overrides):
    cfg = load_config(cls, overrides=overrides)
    assert cfg != cls()  # the overrides really changed something
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    loaded = load_config(cls, path)
    assert loaded == cfg
    assert isinstance(loaded.optim.betas, tuple)
    # the saved file is ordinary YAML with one section per dataclass field
    assert set(yaml.safe_load(path.read_text())) == {f.name for f in dataclasses.fields(cls)}


def _numeric_options(cls, prefix=""):
    """Every numeric leaf of a config tree as (dotted key, annotation, value that puts one number at -1 / nan)."""
    import types
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from _numeric_options(tp, key + ".")
            continue
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
        origin = typing.get_origin(inner)
        if origin in (list, tuple):
            items = typing.get_args(inner)
            if items and items[0] in (int, float):
                default = getattr(cls(), f.name) or [1, 1]
                yield key, items[0], lambda bad, d=list(default): [bad] + d[1:]
        elif inner in (int, float):
            yield key, inner, lambda bad: bad


ALL_NUMERIC = sorted({(cls, key, tp, make) for cls in (CGANConfig, DDPMConfig)
                      for key, tp, make in _numeric_options(cls)}, key=lambda x: (x[0].__name__, x[1]))


@pytest.mark.parametrize("cls,key,tp,make", ALL_NUMERIC, ids=[f"{c.__name__}-{k}" for c, k, _, _ in ALL_NUMERIC])
def test_every_numeric_option_refuses_a_negative_value(cls, key, tp, make):
    """No option of either trainer means anything below zero (sizes, counts, rates, weights, seeds, ids)."""
    value = make(-1)
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}[=\[]"):
        load_config(cls, overrides=[f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])


FLOAT_OPTIONS = [x for x in ALL_NUMERIC if x[2] is float]


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("cls,key,tp,make", FLOAT_OPTIONS, ids=[f"{c.__name__}-{k}" for c, k, _, _ in FLOAT_OPTIONS])
def test_every_float_option_refuses_nan_and_infinity(cls, key, tp, make, bad):
    value = make("BAD")
    text = yaml.safe_dump(value, default_flow_style=True).strip().replace("BAD", bad)
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}(\[\d\])?=.*must be a finite number"):
        load_config(cls, overrides=[f"{key}={text}"])


def test_the_numeric_walk_sees_every_section():
    keys = {key for _, key, _, _ in ALL_NUMERIC}
    assert {"optim.lr", "optim.lr_g", "optim.max_grad_norm", "optim.weight_decay", "optim.betas",
            "diffusion.sample_guidance", "eval.guidance", "eval.steps", "log.showcase_class", "seed",
            "data.classes", "diffusion.sample_guidance_interval", "model.bn_eps"} <= keys
    assert len(FLOAT_OPTIONS) >= 15


@pytest.mark.parametrize("override,message", [
    ("diffusion.sample_steps=2000", "diffusion.sample_steps=2000: must be at most diffusion.num_train_timesteps=1000"),
    ("optim.max_grad_norm=0", "optim.max_grad_norm=0.0: must be positive or null"),
    ("model.channels=2", "model.channels=2: valid choices are 1, 3 or null"),
])
def test_ddpm_options_checked_against_each_other(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", "[.]").replace("(", r"\(")):
        load_config(DDPMConfig, overrides=[override])
