"""`train.compile_mode`: torch.compile's mode, CUDA graphs where they apply, a stated fallback where they do not."""

import pytest
import torch
from accelerate import Accelerator

from pipelines.config import CGANConfig, ConfigError, DDPMConfig, load_config
from pipelines.run import apply_speed_options, compile_mode, uses_cuda_graphs
from test_cgan import TINY
from trainer_utils import run_script


@pytest.mark.parametrize("cls", [CGANConfig, DDPMConfig])
def test_an_unknown_mode_names_the_choices(cls):
    with pytest.raises(ConfigError, match=r"train.compile_mode.*'fast'.*reduce-overhead.*max-autotune"):
        load_config(cls, overrides=["train.compile=true", "train.compile_mode=fast"])


def test_a_mode_without_compile_is_refused():
    with pytest.raises(ConfigError, match="train.compile_mode=reduce-overhead needs train.compile=true"):
        load_config(CGANConfig, overrides=["train.compile_mode=reduce-overhead"])


@pytest.mark.parametrize("mode, on_cpu", [("default", "default"), ("reduce-overhead", "default"),
                                          ("max-autotune", "max-autotune-no-cudagraphs"),
                                          ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_cuda_graphs_only_on_cuda(mode, on_cpu):
    assert compile_mode(mode, torch.device("cuda", 0)) == (mode, None)
    used, why = compile_mode(mode, torch.device("cpu"))
    assert used == on_cpu
    assert (why is None) == (mode == on_cpu)
    if why:
        assert f"train.compile_mode={mode}" in why and "CUDA graphs need a CUDA device" in why and on_cpu in why
    cfg = load_config(CGANConfig, overrides=["train.compile=true", f"train.compile_mode={mode}"])
    graphs = mode in ("reduce-overhead", "max-autotune")
    assert uses_cuda_graphs(cfg, torch.device("cuda", 0)) == graphs
    assert not uses_cuda_graphs(cfg, torch.device("cpu"))
    plain = load_config(CGANConfig, overrides=[])
    assert not uses_cuda_graphs(plain, torch.device("cuda", 0))


def test_the_models_are_compiled_in_the_mode_that_applies(capsys):
    cfg = load_config(CGANConfig, overrides=["train.compile=true", "train.compile_mode=reduce-overhead"])
    model = torch.nn.Linear(2, 2)
    modes = []
    compile_in_place = model.compile
    model.compile = lambda **kw: (modes.append(kw.get("mode")), compile_in_place(**kw))
    apply_speed_options(cfg, Accelerator(cpu=True), model)
    assert modes == ["default"]
    assert "compiling with mode=default instead" in capsys.readouterr().out


@pytest.mark.slow
def test_reduce_overhead_trains_on_cpu_by_falling_back(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_script("train_cgan", CGANConfig, out, TINY + ["train.compile=true",
                                                                  "train.compile_mode=reduce-overhead"]) == 0
    assert "CUDA graphs need a CUDA device" in capsys.readouterr().out
    assert (out / "pipeline" / "model_index.json").is_file()


@pytest.mark.parametrize("family", ["cgan", "ddpm"])
def test_the_sampler_is_compiled_for_evaluation_without_cuda_graphs_on_cpu(family):
    from pipelines.evaluation import compile_sampler
    from test_hub_exports import FAMILIES

    pipe = FAMILIES[family]()
    net = pipe.unet if family == "ddpm" else pipe.model
    modes = []
    compile_in_place = net.compile
    net.compile = lambda **kw: (modes.append(kw.get("mode")), compile_in_place(**kw))
    mode, why = compile_sampler(pipe)
    assert modes == [mode] == ["default"]
    assert "CUDA graphs need a CUDA device" in why
