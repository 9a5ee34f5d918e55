"""Recovery fine-tuning: LoRA through PEFT on a checkpoint's Transformers model, merged back.

The checkpoint's own Transformers model (hf_modeling/) names its modules as the checkpoint names
its tensors, so PEFT's adapters attach to the block linears (attn.q ... mlp.down) by those names,
and once merged (W + B A * alpha / rank) the model's state dict *is* a checkpoint's tensors: they
are written back through the checkpoint writer, with the source's config, a "finetuning" record
and the tokenizer. The shortcut matrices are plain parameters, not linears: with
`train_shortcuts` they are trained whole rather than through adapters.

The objective is the language-model loss on the text, or, given a `Distillation`, the KL
divergence to a dense teacher's next-token distribution (distillation.py). Training runs in
float32 (float64 for a float64 checkpoint); the result is stored in the source's dtype unless
another is asked. Each step takes the next batch, cycling; padding (mask False) is not predicted.
"""

from __future__ import annotations

import datetime
import functools
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sliceserve.checkpoint import CheckpointWriter, check_destination, checkpoint_spec, read_config
from sliceserve.errors import SliceserveError
from sliceserve.finetuning.distillation import Distillation, check_teacher_fits, distillation_loss
from sliceserve.hf_modeling import loadable_by_transformers
from sliceserve.model.loader import load_tokenizer
from sliceserve.model.spec import BLOCK_LINEARS
from sliceserve.slicing.checkpoint_writer import DTYPES, library_versions

Batches = list[tuple[torch.Tensor, torch.Tensor]]

LORA_TARGETS = tuple(name.split(".")[1] for name in BLOCK_LINEARS)  # q, k, v, o, gate, up, down


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0  # the adapter's update is scaled by alpha / rank
    steps: int = 100
    learning_rate: float = 2e-4
    train_shortcuts: bool = False
    seed: int = 0

    def check(self) -> None:
        if self.rank < 1 or self.steps < 1:
            raise SliceserveError(f"--rank and --steps must be at least 1, got {self.rank} and {self.steps}")
        if not self.learning_rate > 0:
            raise SliceserveError(f"--lr must be positive, got {self.learning_rate}")


def training_dtype(stored: torch.dtype) -> torch.dtype:
    return torch.float64 if stored == torch.float64 else torch.float32


def lora_model(checkpoint: Path, settings: LoraSettings, device: torch.device, dtype: torch.dtype):
    """The checkpoint's Transformers model with LoRA adapters on every block linear."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SliceserveError("fine-tuning needs PEFT: pip install 'sliceserve[finetune]' (or peft)") from None
    from sliceserve.hf_modeling.modeling_sliceserve import SliceserveForCausalLM

    model = SliceserveForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device)
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    targets = [t for t in LORA_TARGETS if t in present]
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=targets, lora_dropout=0.0)
    with warnings.catch_warnings():  # PEFT still calls a method Transformers 5 deprecated: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    if settings.train_shortcuts:
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1].endswith("shortcut"):
                parameter.requires_grad_(True)
    return peft_model, targets


def batch_loss(model, tokens: torch.Tensor, mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    tokens, mask = tokens.to(device), mask.to(device)
    return model(input_ids=tokens, attention_mask=mask.long(), labels=tokens.masked_fill(~mask, -100)).loss


def finetune_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    batches: Batches,
    settings: LoraSettings,
    *,
    device: str = "cpu",
    data: dict | None = None,
    distillation: Distillation | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Train LoRA adapters (and, if asked, the shortcuts) on `batches`, merge, write `out` (in
    `dtype`, default the source's). With `distillation` the loss is the KL to its teacher."""
    settings.check()
    if not batches:
        raise SliceserveError("fine-tuning needs training text (no batches given)")
    checkpoint = Path(checkpoint)
    config = read_config(checkpoint)
    if config.get("sparsity"):
        raise SliceserveError(
            f"{checkpoint} is {config['sparsity'].get('pattern')} pruned: merged adapters would fill its zeros"
        )
    stored = DTYPES.get(config.get("dtype"), torch.float32)
    check_destination(Path(out).absolute(), overwrite)
    tokenizer = load_tokenizer(checkpoint) if (checkpoint / "tokenizer_config.json").is_file() else None
    objective = batch_loss
    if distillation is not None:
        distillation.check()
        seqlen = max(tokens.shape[1] for tokens, _ in batches)
        check_teacher_fits(distillation.teacher, checkpoint_spec(config), tokenizer, seqlen)
        objective = functools.partial(distillation_loss, distillation)
    dev = torch.device(device)
    torch.manual_seed(settings.seed)  # PEFT draws each adapter's A at random
    model, targets = lora_model(checkpoint, settings, dev, training_dtype(stored))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    model.train()
    losses = []
    started = time.perf_counter()
    title = "distilling (LoRA, KL to the teacher)" if distillation else "fine-tuning (LoRA)"
    bar = tqdm(range(settings.steps), desc=title, unit="step", disable=not progress)
    for step in bar:
        loss = objective(model, *batches[step % len(batches)], dev)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    seconds = time.perf_counter() - started
    merged = model.merge_and_unload().eval()
    dtype = dtype or stored
    with CheckpointWriter(out, dtype=dtype, overwrite=overwrite) as writer:
        for name, tensor in merged.state_dict().items():
            writer.add(name, tensor)
        record = {
            "method": "lora",
            "objective": "distillation" if distillation else "language-model",
            **({"distillation": distillation.record()} if distillation else {}),
            "source": str(checkpoint.resolve()),
            **asdict(settings),
            "targets": targets,
            "data": data or {},
            "batches": len(batches),
            "tokens": int(sum(int(m.sum()) for _, m in batches)),
            "loss": {
                "first_step": round(losses[0], 6),
                "last_tenth_mean": round(sum(tail := losses[-max(1, len(losses) // 10) :]) / len(tail), 6),
            },
            "seconds": round(seconds, 2),
            "device": device,
            "training_dtype": str(training_dtype(stored)).removeprefix("torch."),
        }
        finished = {
            **config,
            "dtype": str(dtype).removeprefix("torch."),
            "finetuning": record,
            "versions": library_versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        return writer.finish(loadable_by_transformers(writer, finished), tokenizer)
