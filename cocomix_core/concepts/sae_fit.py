"""Train a TopK SAE on residual activations streamed from a teacher layer (OpenAI-style recipe).

Data: the teacher's residual after block `layer_index` (pre final norm; captured with a hook
that stops the forward there, so upper blocks and the LM head never run). Activations of
`teacher_batch_size` windows at a time go into a shuffled buffer; each SAE step draws
`batch_tokens` of them. With `activation_tokens` set, that many activations are captured once
and every pass over them (an epoch) is a fresh shuffle: a large pretrained teacher's forward
costs far more than an SAE step, so on CPUs the SAE sees each activation several times.

Objective, on normalised inputs x̂ = LN(x) (the SPEC's LN):
    main  = nmse(x̂', x̂)          x̂' = decoder(a) + pre_bias, a = TopK latents
    auxk  = nmse(e', e)           e = x̂ - x̂'.detach(), e' = decoder(ReLU(top-aux_k of p
                                  restricted to dead latents))
    loss  = main + aux_coef · auxk    (auxk = 0 while no latent is dead)
    nmse(y', y) = Σ||y' - y||² / Σ||y - mean_tokens(y)||²  over the batch.
A latent is dead when it has not fired for more than `dead_steps_threshold` SAE steps.

Parametrisation: decoder columns have unit norm: before each Adam step the gradient
component parallel to each column is removed, after it the columns are renormalised.
Init: decoder columns random unit vectors, encoder = decoder transpose, latent_bias 0,
pre_bias = geometric median (Weiszfeld iterations) of the first batch of normalised
activations.

Reported: `fvu` = Σ||x - x'||² / Σ||x - mean_tokens(x)||² on a held-out batch, in the
un-normalised residual space (also `fvu_normalized`, the same in x̂ space), `dead_fraction`
(latents dead at the end of training), `eval_unused_fraction` (latents that never fire on the
held-out batch), `mean_l0` (non-zero latents per held-out token; <= k).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cocomix_core.concepts.labels import capture_residual, freeze
from cocomix_core.concepts.sae import TopKSAE
from cocomix_core.plumbing.progress import Progress

if TYPE_CHECKING:
    from settings.schema import SAESettings


@dataclass
class SAETrainConfig:
    """Knobs of SAE training. batch_tokens activations per step; windows per teacher call."""

    num_latents: int = 4096
    k: int = 32
    steps: int = 200
    batch_tokens: int = 1024
    lr: float = 1e-3
    aux_k: int = 256
    aux_coef: float = 1.0 / 32.0
    dead_steps_threshold: int = 50
    teacher_batch_size: int = 8  # windows per teacher forward
    activation_tokens: int | None = None  # captured once and reused every epoch; None: fresh activations throughout
    buffer_batches: int = 8  # the shuffle buffer holds this many SAE batches
    eval_windows: int = 8  # held-out windows for the reported metrics
    geometric_median_iters: int = 20
    seed: int = 0


def _nmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    baseline = (target - target.mean(dim=0, keepdim=True)).pow(2).sum()
    return (pred - target).pow(2).sum() / baseline.clamp_min(1e-12)


def geometric_median(points: torch.Tensor, iters: int = 20, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm over the rows of `points`, starting from their mean."""
    median = points.mean(dim=0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(eps)
        median = (weights[:, None] * points).sum(dim=0) / weights.sum()
    return median


def _window_batches(windows: Any, first: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Token batches: from TrainWindows (global samples first, first+batch_size, ...) or any iterable."""
    if hasattr(windows, "batch") and hasattr(windows, "block_size"):
        sample = first
        while True:
            yield torch.from_numpy(windows.batch(sample, batch_size))
            sample += batch_size
    else:
        for batch in windows:
            yield torch.as_tensor(np.asarray(batch) if not isinstance(batch, torch.Tensor) else batch)


class ActivationStream:
    """Shuffled batches of teacher residual activations (N×d float32)."""

    def __init__(self, teacher: nn.Module, batches: Iterator[torch.Tensor], layer_index: int, batch_tokens: int,
                 buffer_tokens: int, generator: torch.Generator, device: torch.device,
                 pool_tokens: int | None = None) -> None:
        self.teacher, self.batches, self.layer_index = teacher, batches, layer_index
        self.batch_tokens, self.buffer_tokens = batch_tokens, max(buffer_tokens, batch_tokens)
        self.generator, self.device = generator, device
        self.buffer = torch.empty(0)
        self.pool: torch.Tensor | None = None
        if pool_tokens is not None:  # capture once; each epoch is a new permutation of the pool
            self.buffer_tokens = max(pool_tokens, batch_tokens)
            self._fill()
            self.pool = self.buffer

    def _fill(self) -> None:
        parts = [self.buffer]
        have = self.buffer.shape[0]
        while have < self.buffer_tokens:
            try:
                ids = next(self.batches)
            except StopIteration:
                break
            acts = capture_residual(self.teacher, ids.to(self.device), self.layer_index)
            acts = acts.reshape(-1, acts.shape[-1]).float()
            parts.append(acts)
            have += acts.shape[0]
        if have < self.batch_tokens:
            raise ValueError(f"activation source ran out: {have} tokens left, a step needs {self.batch_tokens}")
        buffer = torch.cat([p.to(self.device) for p in parts if p.numel()])
        perm = torch.randperm(buffer.shape[0], generator=self.generator).to(self.device)
        self.buffer = buffer[perm]

    def next(self) -> torch.Tensor:
        if self.pool is not None:
            if self.buffer.shape[0] < self.batch_tokens:
                self.buffer = self.pool[torch.randperm(self.pool.shape[0], generator=self.generator).to(self.device)]
        elif self.buffer.shape[0] < max(self.batch_tokens, self.buffer_tokens // 2):
            self._fill()
        batch, self.buffer = self.buffer[: self.batch_tokens], self.buffer[self.batch_tokens :]
        return batch


def init_sae(num_latents: int, width: int, k: int, first_batch_normalized: torch.Tensor, generator: torch.Generator,
             geometric_median_iters: int = 20) -> TopKSAE:
    sae = TopKSAE(num_latents, width, k)
    with torch.no_grad():
        directions = torch.randn(width, num_latents, generator=generator)
        directions /= directions.norm(dim=0, keepdim=True)
        sae.decoder.weight.copy_(directions)
        sae.encoder.weight.copy_(directions.t())
        sae.latent_bias.zero_()
        sae.pre_bias.copy_(geometric_median(first_batch_normalized.cpu().double(), geometric_median_iters).float())
    return sae


def _project_decoder_grad(decoder_weight: torch.Tensor) -> None:
    """Remove the gradient component parallel to each (unit) decoder column."""
    grad = decoder_weight.grad
    if grad is not None:
        parallel = (grad * decoder_weight).sum(dim=0, keepdim=True)
        grad.sub_(parallel * decoder_weight)


@torch.no_grad()
def _normalize_decoder(decoder_weight: torch.Tensor) -> None:
    decoder_weight.div_(decoder_weight.norm(dim=0, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, acts: torch.Tensor) -> dict[str, float]:
    """FVU (raw and normalised space), mean L0 and unused-latent fraction on activations N×d."""
    x_hat, info = sae.preprocess(acts)
    values, indices = sae.topk_sparse(sae.pre_activations(x_hat))
    recon_hat = sae.decode_sparse_normalized(values, indices)
    recon = recon_hat * info["std"] + info["mu"] if sae.normalize else recon_hat
    fvu = (acts - recon).pow(2).sum() / (acts - acts.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=acts.device)
    fired[indices[values > 0]] = True
    return {
        "fvu": float(fvu),
        "fvu_normalized": float(_nmse(recon_hat, x_hat)),
        "mean_l0": float((values > 0).sum(-1).float().mean()),
        "eval_unused_fraction": float(1.0 - fired.float().mean()),
    }


def train_sae(
    teacher: nn.Module,
    windows: Any,
    layer_index: int,
    config: SAETrainConfig | None = None,
    device: str | torch.device = "cpu",
    log_fn: Callable[[dict[str, Any]], None] | None = None,
    log_every: int = 50,
    **overrides: Any,
) -> tuple[TopKSAE, dict[str, Any]]:
    """Train a TopK SAE on teacher activations; returns (sae on `device`, metrics).

    `windows` is a TrainWindows (held-out: global samples 0..eval_windows-1; training streams
    from sample eval_windows onward) or any iterable of B×T token batches (held-out: its first
    batch). Keyword overrides set SAETrainConfig fields (num_latents=..., k=..., steps=...).
    """
    config = SAETrainConfig(**{**asdict(config or SAETrainConfig()), **overrides})
    if not 1 <= config.k <= config.num_latents:
        raise ValueError(f"SAE k={config.k} must be between 1 and num_latents={config.num_latents}")
    device = torch.device(device)
    # Adam moments of rarely firing latents decay into float32 denormals, which are ~100x
    # slower on CPUs; flush them to zero while training (reset to torch's default after).
    torch.set_flush_denormal(True)
    try:
        return _train(teacher, windows, layer_index, config, device, log_fn, log_every)
    finally:
        torch.set_flush_denormal(False)


class LatentStats:
    """Per-latent firing statistics over training: steps since each last fired, fire counts, mean squares."""

    def __init__(self, num_latents: int, device: torch.device) -> None:
        self.steps_since_fired = torch.zeros(num_latents, dtype=torch.long, device=device)
        self.fire_count = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.square_sum = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.tokens_seen = 0

    @torch.no_grad()
    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Count one step's TopK activations (tokens × k values at latent `indices`)."""
        fired = torch.zeros_like(self.steps_since_fired, dtype=torch.bool)
        fired[indices[values > 0]] = True
        self.steps_since_fired = torch.where(fired, torch.zeros_like(self.steps_since_fired), self.steps_since_fired + 1)
        active_values, active_indices = values.detach().double().reshape(-1), indices.reshape(-1)
        self.fire_count.index_add_(0, active_indices, (active_values > 0).double())
        self.square_sum.index_add_(0, active_indices, active_values.pow(2))
        self.tokens_seen += values.shape[0]

    def dead(self, threshold: int) -> torch.Tensor:
        """Latents that have not fired for more than `threshold` steps."""
        return self.steps_since_fired > threshold

    @torch.no_grad()
    def store_in(self, sae: TopKSAE) -> None:
        """Write the statistics into the SAE's buffers (saved with it)."""
        tokens = max(self.tokens_seen, 1)
        sae.stats_last_nonzero.copy_(self.steps_since_fired)
        sae.latents_activation_frequency.copy_((self.fire_count / tokens).float())
        sae.latents_mean_square.copy_((self.square_sum / tokens).float())


def _eval_activations_and_stream(teacher: nn.Module, windows: Any, layer_index: int, config: SAETrainConfig,
                                 generator: torch.Generator, device: torch.device
                                 ) -> tuple[torch.Tensor, ActivationStream]:
    """(held-out activations, tokens × width; the training activation stream over the windows after them)."""
    if hasattr(windows, "batch"):
        eval_ids = torch.from_numpy(windows.batch(0, config.eval_windows))
        source = _window_batches(windows, config.eval_windows, config.teacher_batch_size)
    else:
        source = _window_batches(windows, 0, config.teacher_batch_size)
        eval_ids = next(source)
    eval_acts = capture_residual(teacher, eval_ids.to(device), layer_index)
    stream = ActivationStream(teacher, source, layer_index, config.batch_tokens,
                              config.buffer_batches * config.batch_tokens, generator, device, config.activation_tokens)
    return eval_acts.reshape(-1, eval_acts.shape[-1]).float(), stream


def _sae_loss(sae: TopKSAE, acts: torch.Tensor, stats: LatentStats, config: SAETrainConfig
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(loss, main nmse, auxk nmse, dead latents) of one batch; counts its activations into `stats` (module doc)."""
    x_hat, _ = sae.preprocess(acts)
    pre = sae.pre_activations(x_hat)
    values, indices = sae.topk_sparse(pre)
    recon = sae.decode_sparse_normalized(values, indices)
    main = _nmse(recon, x_hat)
    stats.update(values, indices)
    dead = stats.dead(config.dead_steps_threshold)
    num_dead = int(dead.sum())
    if num_dead == 0 or config.aux_coef == 0:
        return main, main, torch.zeros((), device=acts.device), num_dead
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    aux_values, aux_indices = torch.topk(dead_pre, k=min(config.aux_k, config.num_latents, num_dead), dim=-1)
    aux_recon = sae.decode_sparse_normalized(F.relu(aux_values), aux_indices) - sae.pre_bias
    auxk = _nmse(aux_recon, x_hat - recon.detach())
    return main + config.aux_coef * auxk, main, auxk, num_dead


def _train(teacher: nn.Module, windows: Any, layer_index: int, config: SAETrainConfig, device: torch.device,
           log_fn: Callable[[dict[str, Any]], None] | None, log_every: int) -> tuple[TopKSAE, dict[str, Any]]:
    freeze(teacher)
    teacher.to(device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    eval_acts, stream = _eval_activations_and_stream(teacher, windows, layer_index, config, generator, device)
    acts = stream.next()
    first_hat, _ = TopKSAE(1, acts.shape[-1], 1).preprocess(acts)
    sae = init_sae(config.num_latents, acts.shape[-1], config.k, first_hat, generator,
                   config.geometric_median_iters).to(device)
    sae.train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    stats = LatentStats(config.num_latents, device)
    start_time = time.perf_counter()

    with Progress("sae", config.steps) as progress:
        for step in range(config.steps):
            if step > 0:
                acts = stream.next()
            loss, main, auxk, num_dead = _sae_loss(sae, acts, stats, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _project_decoder_grad(sae.decoder.weight)
            optimizer.step()
            _normalize_decoder(sae.decoder.weight)
            if log_fn is not None and (step % log_every == 0 or step == config.steps - 1):
                log_fn({"sae_step": step, "sae_loss": float(loss.detach()), "sae_nmse": float(main.detach()),
                        "sae_auxk": float(auxk.detach()), "sae_dead_fraction": num_dead / config.num_latents})
            progress.set_values(nmse=float(main.detach()), dead=f"{num_dead / config.num_latents:.1%}")
            progress.update()

    sae.eval()
    stats.store_in(sae)
    metrics: dict[str, Any] = evaluate_sae(sae, eval_acts)
    metrics.update(
        dead_fraction=float(stats.dead(config.dead_steps_threshold).float().mean()),
        steps=config.steps,
        tokens_seen=stats.tokens_seen,
        train_seconds=time.perf_counter() - start_time,
        config=asdict(config),
    )
    return sae, metrics


def sae_train_config(sae: "SAESettings", block_size: int) -> SAETrainConfig:
    """The SAETrainConfig of the `sae` settings section (SAE steps draw sae.batch_size windows of block_size)."""
    batch_tokens = sae.batch_size * block_size
    return SAETrainConfig(
        num_latents=sae.num_latents, k=sae.k, steps=sae.steps, batch_tokens=batch_tokens, lr=sae.lr,
        aux_k=sae.aux_k, aux_coef=sae.aux_coef, dead_steps_threshold=max(1, sae.dead_after_tokens // batch_tokens),
        teacher_batch_size=sae.batch_size, activation_tokens=sae.activation_tokens, seed=sae.seed,
    )
