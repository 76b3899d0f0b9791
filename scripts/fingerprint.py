"""Fingerprint what the trainers produce, to prove a refactor changed no behaviour.

    python scripts/fingerprint.py --out before.json            # on the old code
    python scripts/fingerprint.py --out after.json --compare before.json

Runs small real trainings through the command line only (so any version of the code can be
fingerprinted): both families with EMA, evaluation, snapshots and their options switched on, a
run stopped and resumed, and a 2-process `accelerate launch`. Records the SHA-256 of every
tensor the exports and the last checkpoint hold, of every picture, and the logged losses.
Needs real Fashion-MNIST (`dataset-fashion-mnist`) for the evaluation runs; about 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CGAN = ["data.name=synthetic", "data.synthetic_size=256", "model.base_channels=8", "model.latent_dim=16",
        "model.label_emb_dim=8", "train.batch_size=32", "log.every_steps=3", "seed=7"]
DDPM = ["data.name=synthetic", "data.synthetic_size=128", "data.synthetic_image_size=16",
        "model.block_out_channels=[8,16]", "model.attention=[false,true]", "model.layers_per_block=1",
        "model.norm_num_groups=4", "diffusion.num_train_timesteps=50", "diffusion.sample_steps=3",
        "train.batch_size=16", "log.every_steps=3", "seed=5"]
FMNIST_EVAL = ["data.name=fashion_mnist", "data.limit=512", "eval.every_epochs=1", "eval.num_per_class=5",
               "eval.snapshot_epochs=[1]"]
RUNS = {
    "cgan_report_a_ema": ("train_cgan", CGAN + ["train.epochs=2", "train.ema_decay=0.9", "loss.mode_seeking=0.5"]),
    "cgan_notes_e_wgan": ("train_cgan", CGAN + ["model.arch=notes_e", "loss.name=wgan_gp", "loss.critic_steps=2",
                                                "model.d_norm=spectral", "model.d_class_std=true", "train.epochs=1"]),
    "cgan_hinge_projection": ("train_cgan", CGAN + ["loss.name=hinge", "model.d_conditioning=projection",
                                                    "model.noise=uniform", "train.epochs=1"]),
    "cgan_fmnist_eval": ("train_cgan", CGAN + FMNIST_EVAL + ["train.epochs=2", "train.ema_decay=0.9"]),
    "ddpm_ema_cfg": ("train_ddpm", DDPM + ["train.epochs=2", "train.ema_decay=0.9", "diffusion.snr_gamma=5.0",
                                           "train.gradient_accumulation_steps=2", "log.showcase_class=1"]),
    "ddpm_v_onecycle": ("train_ddpm", DDPM + ["diffusion.prediction_type=v_prediction", "optim.schedule=onecycle",
                                              "diffusion.beta_schedule=squaredcos_cap_v2", "train.epochs=1",
                                              "diffusion.label_dropout=0"]),
    "ddpm_fmnist_eval": ("train_ddpm", DDPM + FMNIST_EVAL + ["data.pad_to=32", "train.epochs=2",
                                                             "model.block_out_channels=[8,16,16]",
                                                             "model.attention=[false,false,false]",
                                                             "train.ema_decay=0.9"]),
}
# Stopped after the first epoch's checkpoint by max_steps, then resumed to the end.
RESUMED = {"cgan_report_a_ema": 8, "ddpm_ema_cfg": 4}
LAUNCHED = {"cgan_two_processes": ("train_cgan", CGAN + ["train.epochs=1", "train.batch_size=16"]),
            "ddpm_two_processes": ("train_ddpm", DDPM + ["train.epochs=1", "train.batch_size=8"])}


def run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def train(script: str, overrides: list[str], out: Path, *extra: str) -> None:
    run([sys.executable, str(ROOT / f"{script}.py"), f"output_dir={out}", "log.wandb=disabled", *overrides, *extra],
        ROOT)


def tensors_digest(path: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {key: hashlib.sha256(value.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
                                ).hexdigest()[:16]
            for key, value in sorted(load_file(str(path)).items())}


def fingerprint(out: Path) -> dict:
    """Tensors of every export and of the last checkpoint's model files, pictures, and the logged losses."""
    result: dict = {}
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    places = [p for p in ("pipeline", "best", "snapshots") if (out / p).exists()]
    files = [f for p in places for f in sorted((out / p).rglob("*.safetensors"))]
    if checkpoints:
        files += sorted(checkpoints[-1].glob("*.safetensors"))
    for f in files:
        name = str(f.relative_to(out)).replace(checkpoints[-1].name if checkpoints else "\0", "last")
        result[name] = tensors_digest(f)
    for png in sorted(out.rglob("*.png")):
        result[str(png.relative_to(out))] = hashlib.sha256(png.read_bytes()).hexdigest()[:16]
    losses = []
    for line in (out / "stats.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses.append({k: v for k, v in record.items() if k.startswith(("loss", "eval/fid", "eval/accuracy", "step"))})
    result["stats"] = losses
    best = out / "best" / "best.json"
    if best.is_file():
        result["best.json"] = json.loads(best.read_text())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="write the fingerprints here (JSON)")
    parser.add_argument("--compare", help="a fingerprint file to compare with; exit 1 on any difference")
    parser.add_argument("--only", nargs="*", help="run only these names")
    args = parser.parse_args()
    prints = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, (script, overrides) in RUNS.items():
            if args.only and name not in args.only:
                continue
            train(script, overrides, tmp / name)
            prints[name] = fingerprint(tmp / name)
            if name in RESUMED:
                train(script, overrides + [f"train.max_steps={RESUMED[name]}"], tmp / f"{name}_resumed")
                train(script, overrides, tmp / f"{name}_resumed", "--resume", "latest")
                prints[f"{name}_resumed"] = fingerprint(tmp / f"{name}_resumed")
            print(f"{name}: {len(prints[name])} entries", flush=True)
        for name, (script, overrides) in LAUNCHED.items():
            if args.only and name not in args.only:
                continue
            run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                 "--main_process_port", "29731", str(ROOT / f"{script}.py"), f"output_dir={tmp / name}",
                 "log.wandb=disabled", *overrides], ROOT)
            prints[name] = fingerprint(tmp / name)
            print(f"{name}: {len(prints[name])} entries", flush=True)
    Path(args.out).write_text(json.dumps(prints, indent=1, sort_keys=True))
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
    differences = []
    for name in sorted(set(before) | set(prints)):
        a, b = before.get(name, {}), prints.get(name, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                differences.append(f"{name}: {key}")
    print("\n".join(differences) or f"identical: {len(prints)} runs, {sum(map(len, prints.values()))} entries")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
