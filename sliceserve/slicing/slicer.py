"""Progressive SliceGPT: rotate each point of the residual stream onto its principal
components and keep the leading ones, one layer at a time.

Layer l's signals come from running the calibration tokens through layers 0..l-1 as
already rotated and sliced, so later layers see (and absorb) the earlier slicing. The
model is streamed: at any time we hold one layer's weights (float64 while rotating) and
the calibration activations; finished tensors go straight to the checkpoint writer.

Notation (F.linear layout): Q_d is the D x d matrix of the first d principal directions
of a point. A linear reading the stream: W <- W Q_in_d. A linear writing it:
W <- Q_out_d^T W, b <- b Q_out_d. Shortcut between points: Q_out_d^T Q_in_d.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sliceserve.errors import SliceserveError
from sliceserve.model.decoder import MLP, Attention, rms_norm
from sliceserve.model.rope import inverse_frequencies, rope_tables
from sliceserve.model.spec import (
    ATTENTION_READERS,
    ATTENTION_WRITER,
    MLP_READERS,
    MLP_WRITER,
    DecoderSpec,
    LayerWidths,
)
from sliceserve.slicing.families import decoder_spec
from sliceserve.slicing.fusion import Tensors, fused_embeddings, fused_head, fused_layer
from sliceserve.slicing.pca import Covariance, explained_variance
from sliceserve.slicing.sources import ModelSource

log = logging.getLogger(__name__)

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # (tokens (b, T), mask (b, T)) pairs


def kept_width(original_width: int, sparsity: float, round_to: int) -> int:
    """Width kept at a point: (1 - sparsity) D rounded down to a multiple of round_to."""
    if not 0 <= sparsity < 1:
        raise SliceserveError(f"--sparsity must be in [0, 1), got {sparsity}")
    kept = math.floor(round((1 - sparsity) * original_width, 6))  # 1 - 0.8 is 0.19999...: round first
    if kept < original_width:
        kept -= kept % round_to
    if kept <= 0:
        raise SliceserveError(f"sparsity {sparsity} leaves no width out of {original_width}")
    return kept


@dataclass
class SliceResult:
    spec: DecoderSpec
    explained: dict  # explained variance per point
    seconds: float


class ActivationStore:
    """Per-batch activations, kept on the compute device when they fit, else in host memory."""

    def __init__(self, device: torch.device, on_device: bool):
        self.device, self.on_device = device, on_device
        self.items: list[torch.Tensor] = []

    def put(self, index: int, x: torch.Tensor) -> None:
        x = x if self.on_device else x.to("cpu", non_blocking=False)
        if index == len(self.items):
            self.items.append(x)
        else:
            self.items[index] = x

    def get(self, index: int) -> torch.Tensor:
        return self.items[index].to(self.device)


def activations_fit(device: torch.device, tokens: int, width: int, dtype: torch.dtype) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    # the stored stream plus one wider intermediate per batch; keep half the card for the layer
    return 2 * tokens * width * dtype.itemsize < 0.5 * free


def with_prefix(prefix: str, tensors: Tensors) -> Tensors:
    return {f"{prefix}.{name}": t for name, t in tensors.items()}


def module_inputs(tensors: Tensors, dtype: torch.dtype):
    """A tensor getter for runtime modules, in the activation dtype."""
    return lambda name: None if name not in tensors else tensors[name].to(dtype)


class Slicer:
    """Holds the state of one slicing run (spec, widths, activations, writer)."""

    def __init__(
        self,
        source: ModelSource,
        writer,
        *,
        sparsity: float,
        round_to: int,
        device: torch.device,
        compute_dtype: torch.dtype,
        progress: bool = True,
    ):
        self.source, self.writer, self.family = source, writer, source.family
        self.spec = decoder_spec(self.family, source.config)
        self.device, self.compute_dtype, self.progress = device, compute_dtype, progress
        self.width = kept_width(self.spec.original_width, sparsity, round_to)
        self.eps, self.D = self.spec.norm_eps, self.spec.original_width
        self.inv_freq = None if self.spec.rope is None else inverse_frequencies(self.spec.rope)

    def rope(self, length: int):
        if self.inv_freq is None:
            return None
        return rope_tables(self.inv_freq, torch.arange(length, device=self.device), self.compute_dtype)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.D, self.eps)

    def run(self, batches: Batches) -> SliceResult:
        started = time.perf_counter()
        masks = [mask.to(self.device) for _, mask in batches]
        tokens = sum(int(t.numel()) for t, _ in batches)
        store = ActivationStore(self.device, activations_fit(self.device, tokens, self.D, self.compute_dtype))
        explained: dict = {"embedding": None, "layers": []}

        # Point 0: the embedding output.
        embeddings = fused_embeddings(self.source, self.family, self.device, torch.float64)
        cov = Covariance(self.D, self.device)
        for i, (ids, _) in enumerate(batches):
            x = embeddings["embed.weight"][ids.to(self.device)]
            if "positions.weight" in embeddings:
                x = x + embeddings["positions.weight"][: ids.shape[1]]
            x = x.to(self.compute_dtype)
            cov.add(x, masks[i])
            store.put(i, x)
        basis = self.basis(cov)
        explained["embedding"] = basis[1]
        q_in = basis[0]
        for name, rows in embeddings.items():
            self.writer.add(name, rows @ q_in)
        del embeddings
        for i in range(len(batches)):
            store.put(i, store.get(i) @ q_in.to(self.compute_dtype))

        layers = range(self.spec.num_layers)
        bar = tqdm(layers, desc="slicing layers", unit="layer", disable=not self.progress)
        widths = []
        for index in bar:
            tensors = fused_layer(self.source, self.family, index, self.device, torch.float64)
            step = self.parallel_layer if self.spec.parallel_block else self.sequential_layer
            q_in, layer_widths, layer_explained = step(tensors, q_in, store, masks)
            for name, t in with_prefix(f"layers.{index}", tensors).items():
                self.writer.add(name, t)
            widths.append(layer_widths)
            explained["layers"].append(layer_explained)
            bar.set_postfix(kept=f"{layer_explained['output']:.4f}")
            # The bar shows it; config.json keeps every layer's (a line per layer would break the bar).
            log.debug("layer %d: explained variance kept %s", index, layer_explained)

        head = fused_head(self.source, self.family, self.device, torch.float64)
        head["head.weight"] = head["head.weight"] @ q_in
        for name, t in head.items():
            self.writer.add(name, t)

        self.spec.layers = widths
        self.spec.embedding_width = widths[0].input_width
        self.spec.head_width = widths[-1].output_width
        self.spec.has_shortcuts = True
        return SliceResult(self.spec, explained, time.perf_counter() - started)

    def basis(self, cov: Covariance) -> tuple[torch.Tensor, float]:
        """The kept principal directions Q_d (D x d, float64) and the variance they explain."""
        q, eigenvalues = cov.principal_basis()
        return q[:, : self.width], explained_variance(eigenvalues, self.width)

    def sequential_layer(self, tensors: Tensors, q_in: torch.Tensor, store: ActivationStore, masks):
        """Attention reads the input point, the MLP the middle point; rotate and slice both."""
        for reader in ATTENTION_READERS:
            tensors[f"{reader}.weight"] = tensors[f"{reader}.weight"] @ q_in
        attention = Attention(self.spec, module_inputs(tensors, self.compute_dtype), "attn")
        q_in_c = q_in.to(self.compute_dtype)
        cov = Covariance(self.D, self.device)
        for i, mask in enumerate(masks):
            z = store.get(i)
            middle = z @ q_in_c.T + attention(self.norm(z), self.rope(z.shape[1]))
            cov.add(middle, mask)
            store.put(i, middle)
        q_mid, mid_explained = self.basis(cov)
        rotate_writer(tensors, ATTENTION_WRITER, q_mid)
        tensors["attn_shortcut"] = q_mid.T @ q_in

        for reader in MLP_READERS:
            if f"{reader}.weight" in tensors:
                tensors[f"{reader}.weight"] = tensors[f"{reader}.weight"] @ q_mid
        mlp = MLP(self.spec, module_inputs(tensors, self.compute_dtype), "mlp")
        q_mid_c = q_mid.to(self.compute_dtype)
        cov = Covariance(self.D, self.device)
        for i, mask in enumerate(masks):
            z = store.get(i) @ q_mid_c
            output = z @ q_mid_c.T + mlp(self.norm(z))
            cov.add(output, mask)
            store.put(i, output)
        q_out, out_explained = self.basis(cov)
        rotate_writer(tensors, MLP_WRITER, q_out)
        tensors["mlp_shortcut"] = q_out.T @ q_mid
        q_out_c = q_out.to(self.compute_dtype)
        for i in range(len(masks)):
            store.put(i, store.get(i) @ q_out_c)
        widths = LayerWidths(q_in.shape[1], q_mid.shape[1], q_out.shape[1])
        return q_out, widths, {"middle": mid_explained, "output": out_explained}

    def parallel_layer(self, tensors: Tensors, q_in: torch.Tensor, store: ActivationStore, masks):
        """Attention and MLP both read the input point and write the output point."""
        for reader in ATTENTION_READERS + MLP_READERS:
            if f"{reader}.weight" in tensors:
                tensors[f"{reader}.weight"] = tensors[f"{reader}.weight"] @ q_in
        get = module_inputs(tensors, self.compute_dtype)
        attention, mlp = Attention(self.spec, get, "attn"), MLP(self.spec, get, "mlp")
        q_in_c = q_in.to(self.compute_dtype)
        cov = Covariance(self.D, self.device)
        for i, mask in enumerate(masks):
            z = store.get(i)
            h = self.norm(z)
            output = z @ q_in_c.T + attention(h, self.rope(z.shape[1])) + mlp(h)
            cov.add(output, mask)
            store.put(i, output)
        q_out, out_explained = self.basis(cov)
        rotate_writer(tensors, ATTENTION_WRITER, q_out)
        rotate_writer(tensors, MLP_WRITER, q_out)
        tensors["shortcut"] = q_out.T @ q_in
        q_out_c = q_out.to(self.compute_dtype)
        for i in range(len(masks)):
            store.put(i, store.get(i) @ q_out_c)
        widths = LayerWidths(q_in.shape[1], None, q_out.shape[1])
        return q_out, widths, {"output": out_explained}


def rotate_writer(tensors: Tensors, writer: str, q: torch.Tensor) -> None:
    """A linear writing the stream now writes its coordinates in the kept basis q (D x d)."""
    tensors[f"{writer}.weight"] = q.T @ tensors[f"{writer}.weight"]
    if f"{writer}.bias" in tensors:
        tensors[f"{writer}.bias"] = tensors[f"{writer}.bias"] @ q
