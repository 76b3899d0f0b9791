"""What both exported pipelines share: class labels, output conversion, and self-contained save/load.

Like the pipeline files, this file imports only torch, diffusers and huggingface_hub: it is copied
beside `pipeline.py` into every export, so stock diffusers can load the export without this project:

    DiffusionPipeline.from_pretrained(path_or_repo_id, trust_remote_code=True)
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

ClassLabels = Union[int, str, Sequence, torch.Tensor]

# Keyword arguments of `from_pretrained` that the components' own `from_pretrained` take too.
COMPONENT_KWARGS = ("torch_dtype", "use_safetensors", "variant", "low_cpu_mem_usage")
# ... and those that only say where the repository is.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")


def make_id2label(id2label: Optional[Dict] = None, class_names: Optional[List[str]] = None) -> Optional[Dict[str, str]]:
    """`{"0": name, ...}` (as `DiTPipeline` keeps it) from itself or from a list of names (exports before it)."""
    if id2label is not None:
        return {str(k): str(v) for k, v in sorted(id2label.items(), key=lambda item: int(item[0]))}
    if class_names is not None:
        return {str(i): str(name) for i, name in enumerate(class_names)}
    return None


def class_label_tensor(class_labels: ClassLabels, id2label: Optional[Dict[str, str]], num_classes: int,
                       device: torch.device) -> torch.Tensor:
    """Class ids or names as a 1-d int64 tensor, checked against the number of classes.

    Takes an int, a name, a tensor, or a list of them, nested or not (`[[1], [1]]`, as diffusers'
    pipeline tests batch their inputs).
    """
    if isinstance(class_labels, torch.Tensor):
        labels = class_labels.reshape(-1).tolist()
    elif isinstance(class_labels, (int, str, np.integer)):
        labels = [class_labels]
    else:
        labels = list(_flatten(class_labels))
    names = {name: int(i) for i, name in (id2label or {}).items()}
    ids = []
    for label in labels:
        if isinstance(label, str):
            if label not in names:
                raise ValueError(f"unknown class name {label!r}; valid names: {', '.join(names) or '(none saved)'}")
            ids.append(names[label])
        else:
            if not 0 <= int(label) < num_classes:
                raise ValueError(f"class label {label} is out of range; valid labels are 0..{num_classes - 1}")
            ids.append(int(label))
    return torch.tensor(ids, dtype=torch.long, device=device)


def _flatten(items):
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        elif isinstance(item, torch.Tensor):
            yield from item.reshape(-1).tolist()
        else:
            yield item


def images_to_output(images: torch.Tensor, output_type: str, numpy_to_pil) -> Union[torch.Tensor, np.ndarray, list]:
    """[-1, 1] (B, C, H, W) -> 'pt' [0, 1] tensor, 'np' [0, 1] (B, H, W, C) array, or 'pil' images."""
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type={output_type!r}: valid choices are pil, np, pt")
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images.cpu()
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    return array if output_type == "np" else numpy_to_pil(array)


class ClassConditionalMixin:
    """What both pipelines add to `DiffusionPipeline`: class names as `DiTPipeline` has them, and a
    `save_pretrained` that puts the code in the folder. The pipeline defines `num_classes`."""

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' `save_pretrained`, plus the code, so the folder loads in stock diffusers by itself."""
        super().save_pretrained(save_directory, **kwargs)
        make_self_contained(self, save_directory)

    @property
    def class_names(self) -> List[str]:
        return [self.config.id2label[k] for k in sorted(self.config.id2label or {}, key=int)]

    @property
    def labels(self) -> Dict[str, int]:
        """Class ids by name (as `DiTPipeline.labels`)."""
        return {name: int(i) for i, name in (self.config.id2label or {}).items()}

    def get_label_ids(self, label: Union[str, List[str]]) -> List[int]:
        """Class ids of names (as `DiTPipeline.get_label_ids`); an unknown name lists the valid ones."""
        return class_label_tensor([label] if isinstance(label, str) else list(label), self.config.id2label,
                                  self.num_classes, torch.device("cpu")).tolist()


def make_self_contained(pipeline, save_directory: Union[str, os.PathLike]) -> None:
    """After `save_pretrained`: put the code beside the weights so stock diffusers loads the folder alone.

    The pipeline's own file becomes `pipeline.py` (with this file beside it), `_class_name` names it
    (`["pipeline", "ClassName"]`, which diffusers resolves by itself under `trust_remote_code=True`),
    and a component whose class is not diffusers' gets its module file in its folder, named in
    `model_index.json` as diffusers' custom components are.
    """
    folder = Path(save_directory)
    source = Path(inspect.getfile(type(pipeline)))
    shutil.copyfile(source, folder / "pipeline.py")
    shutil.copyfile(Path(__file__), folder / "pipeline_common.py")
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = ["pipeline", type(pipeline).__name__]
    for name in pipeline.components:
        component = getattr(pipeline, name)
        module = type(component).__module__
        if component is None or module.split(".")[0] in ("diffusers", "transformers"):
            continue
        module_file = Path(inspect.getfile(type(component)))
        shutil.copyfile(module_file, folder / name / module_file.name)
        index[name] = [module_file.stem, type(component).__name__]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def load_components(cls, pretrained_model_name_or_path: Union[str, os.PathLike], own_classes: Dict[str, type],
                    **kwargs):
    """`cls` from an export folder or Hub repo, whatever class `model_index.json` names.

    `DiffusionPipeline.from_pretrained` would load the export's own copy of the code (its
    `_class_name` names `pipeline.py`); called on this class, the user wants this class. Components
    are diffusers classes or, by class name, `own_classes`.
    """
    import diffusers

    path = Path(pretrained_model_name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(pretrained_model_name_or_path),
                                      **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs}))
    index = json.loads((path / "model_index.json").read_text())
    component_kwargs = {k: kwargs[k] for k in COMPONENT_KWARGS if k in kwargs}
    parameters = inspect.signature(cls.__init__).parameters
    components, _ = cls._get_signature_keys(cls)
    init = {}
    for name, value in index.items():
        if name.startswith("_") or name not in parameters:
            continue
        if name in components:
            library, class_name = value
            component_cls = own_classes.get(class_name) or getattr(diffusers, class_name)
            # dtype, variant and safetensors apply to networks; schedulers are configs only
            is_network = issubclass(component_cls, torch.nn.Module)
            init[name] = component_cls.from_pretrained(path, subfolder=name,
                                                       **(component_kwargs if is_network else {}))
        else:
            init[name] = value
    pipeline = cls(**init)
    pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
    return pipeline
