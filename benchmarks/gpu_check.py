"""GPU readiness check: the GPU features the trainer relies on, and the 69M preset's step speed on synthetic tokens.

    python benchmarks/gpu_check.py            # one GPU, at most ~8 minutes, no network
    python benchmarks/gpu_check.py --cpu      # the same checks CI-sized on CPU, under a minute

Each check prints PASS, FAIL (with the error) or SKIP (with the reason) and never stops the
others. The speed lines print tokens/s and MFU of each arm and the CoCoMix/NTP step-time ratio.
"""

from __future__ import annotations

import argparse
import time
import traceback
from typing import Callable

import torch
import torch.nn.functional as F

from cocomix_core.concepts.labels import ConceptExtractor
from cocomix_core.concepts.sae import TopKSAE
from cocomix_core.model.build import build_model, sized_shape
from cocomix_core.training.trainer import autocast_dtype, flops_per_token, peak_flops
from settings import load_settings
from settings.schema import GPT2_VOCAB_SIZE, ModelShape

RESULTS: dict[str, str] = {}


def check(name: str, skip_reason: str | None = None) -> Callable[[Callable[[], str | None]], None]:
    """Run the decorated check now: PASS (with its detail), FAIL (with the error) or SKIP (with the reason)."""
    def run(body: Callable[[], str | None]) -> None:
        if skip_reason:
            RESULTS[name] = "SKIP"
            print(f"SKIP {name}: {skip_reason}", flush=True)
            return
        try:
            detail = body()
        except Exception as error:  # a failing check must not stop the others
            RESULTS[name] = "FAIL"
            print(f"FAIL {name}: {type(error).__name__}: {error}", flush=True)
            traceback.print_exc(limit=3)
            return
        RESULTS[name] = "PASS"
        print(f"PASS {name}" + (f": {detail}" if detail else ""), flush=True)
    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def arm_speed(kind: str, shape: ModelShape, block_size: int, batch: int, steps: int, device: torch.device,
              concept_dim: int, concept_num: int, insert_layer: int, labels_per_token: int, compile_model: bool
              ) -> tuple[float, float]:
    """(seconds per optimizer step, tokens/s) of `steps` training steps on synthetic tokens, after 3 warm-up steps."""
    model = build_model(kind, shape, block_size, concept_dim=concept_dim, concept_num=concept_num,
                        insert_layer_index=insert_layer, seed=0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(model) if compile_model else model
    dtype = autocast_dtype("auto", device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, shape.vocab_size, (batch, block_size), generator=generator).to(device)
    extra = {}
    if kind == "cocomix":
        extra["concept_labels"] = torch.randint(0, concept_dim, (batch, block_size, labels_per_token),
                                                generator=generator).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            output = forward(ids, labels=ids, **extra)
            loss = output.loss + (0.1 * output.concept_loss if kind == "cocomix" else 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return seconds, batch * block_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CI-sized checks on CPU (tiny shapes, a few steps)")
    parser.add_argument("--steps", type=int, help="timed steps per arm (default: 300 on GPU, 3 on CPU)")
    args = parser.parse_args()

    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible; use --cpu for the CPU-sized checks")
    device = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    no_gpu = None if gpu else "needs a CUDA device (--cpu)"

    @check("bf16 autocast")
    def _() -> str:
        a = torch.randn(64, 64, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            product = a @ a
        assert product.dtype == torch.bfloat16, product.dtype
        return f"matmul under autocast gives {product.dtype}"

    @check("fused AdamW", no_gpu)
    def _() -> str:
        weight = torch.nn.Parameter(torch.ones(1024, device=device))
        optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        assert torch.all(weight < 1), "the fused step did not move the weight"
        return "one fused step moves the weights"

    @check("SDPA flash kernel", no_gpu)
    def _() -> str:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = (torch.randn(4, 8, 1024, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot serve these inputs
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with sdpa_kernel(SDPBackend.MATH):
            reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        error = (out.float() - reference).abs().max().item()
        assert error < 2e-2, f"flash output differs from the math kernel by {error}"
        return f"causal bf16 attention through the flash kernel only; max |flash - math| = {error:.2e}"

    @check("torch.compile", no_gpu)
    def _() -> str:
        model = build_model("ntp", ModelShape(width=128, depth=2, heads=4, vocab_size=GPT2_VOCAB_SIZE), 128, seed=0).to(device)
        compiled = torch.compile(model)
        ids = torch.randint(0, GPT2_VOCAB_SIZE, (2, 128), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager, fused = model(ids).logits.float(), compiled(ids).logits.float()
        compiled(ids, labels=ids).loss.backward()
        error = (eager - fused).abs().max().item()
        assert error < 0.1, f"compiled logits differ from eager by {error}"
        return f"compiled GPT-2 forward+backward; max |compiled - eager| logit = {error:.2e}"

    # ----- the 69M preset's arms (GPU) or the smoke preset's (CPU), synthetic tokens -----------
    settings = load_settings("gpt2_69m" if gpu else "smoke")
    block_size = settings.data.block_size
    batch = 16 if gpu else 4
    steps = args.steps or (300 if gpu else 3)
    peak, peak_source = peak_flops(device)
    print(f"MFU peak: {peak:.4g} FLOP/s ({peak_source})", flush=True)
    step_seconds: dict[str, float] = {}
    for name, arm in settings.arms.items():
        shape = sized_shape(arm.model, settings, None)  # the paper presets' GPT-2 tokenizer

        @check(f"train {name} ({arm.kind}, width {arm.model.width}, {steps} steps of {batch}x{block_size})")
        def _() -> str:
            seconds, tokens_per_s = arm_speed(
                arm.kind, shape, block_size, batch, steps, device, settings.sae.num_latents, arm.concept_num,
                arm.insert_layer_index, settings.concepts.labels_per_token, compile_model=gpu and RESULTS.get(
                    "torch.compile") == "PASS",
            )
            step_seconds[arm.kind] = seconds
            config = build_model(arm.kind, shape, block_size, concept_dim=settings.sae.num_latents,
                                 concept_num=arm.concept_num, insert_layer_index=arm.insert_layer_index, seed=0).config
            mfu = tokens_per_s * flops_per_token(config, block_size) / peak
            print(f"tokens/s {arm.kind}: {tokens_per_s:.1f}  step {seconds * 1000:.1f} ms  MFU {mfu:.3f}", flush=True)
            return None

    if {"ntp", "cocomix"} <= step_seconds.keys():
        print(f"step ratio cocomix/ntp: {step_seconds['cocomix'] / step_seconds['ntp']:.3f}", flush=True)

    # ----- concept extraction: a random GPT-2-small teacher and a 32k TopK SAE ------------------
    teacher_shape = sized_shape(ModelShape(width=768, depth=12, heads=12) if gpu else settings.teacher.model, settings, None)
    latents, top_k = (32768, 32) if gpu else (settings.sae.num_latents, settings.sae.k)

    @check(f"concept extractor (teacher width {teacher_shape.width}, {latents} latents)")
    def _() -> str:
        teacher = build_model("ntp", teacher_shape, block_size, seed=0).to(device)
        torch.manual_seed(0)
        sae = TopKSAE(latents, teacher_shape.width, top_k).to(device)
        extractor = ConceptExtractor(teacher, sae, min(5, teacher_shape.depth - 1))
        ids = torch.randint(0, 50257, (batch, block_size), device=device)
        extractor.concept_labels(ids, settings.concepts.labels_per_token)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        labels = extractor.concept_labels(ids, settings.concepts.labels_per_token)
        synchronize(device)
        seconds = time.perf_counter() - start
        assert labels.shape == (batch, block_size, settings.concepts.labels_per_token)
        assert int(labels.min()) >= 0 and int(labels.max()) < latents
        print(f"tokens/s concept labels: {batch * block_size / seconds:.1f}", flush=True)
        return None

    failed = [name for name, result in RESULTS.items() if result == "FAIL"]
    print(f"summary: {sum(r == 'PASS' for r in RESULTS.values())} passed, {len(failed)} failed, "
          f"{sum(r == 'SKIP' for r in RESULTS.values())} skipped" + (f"; failed: {failed}" if failed else ""))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
