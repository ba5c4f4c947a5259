"""GPU benchmark: d24 bf16 generate latency (AR / refiner / decode, batch 1 and 8, peak memory), d16 and d24 bf16
ZeRO-2 training steps (tokens/s, MFU against the card's bf16 peak), the SDPA backends that ran, and whether
torch.compile helps each. Prints ONE JSON object with every figure and the config it ran.

    python benchmarks/gpu_bench.py                              # one H100/H200: under 8 minutes
    python benchmarks/gpu_bench.py --preset tiny --device cpu   # the same code paths on CPU in seconds (CI)

Random weights and random images (speed does not depend on the values). Generation runs under bf16 autocast like
the served pipeline; training uses the platform's DeepSpeed engine (training/deepspeed_engine.py: ZeRO-2, bf16,
torch AdamW) and ``training.steps.train_step`` (frozen-VQVAE tokenisation + ``model.compute_loss``). Timings
synchronise the device before every clock read. torch.compile variants are measured after the eager ones while the
time budget (``--budget-s``) allows; a compile that fails is reported with its error and does not stop the run.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import VARSRConfig, build  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment, most specific first
BF16_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 SXM", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 6000 Ada", 364.2),
)
SDPA_KERNELS = {  # profiler op names -> backend
    "flash": ("_scaled_dot_product_flash_attention", "_flash_attention_forward", "flash_attention_for_cpu"),
    "memory_efficient": ("_scaled_dot_product_efficient_attention", "_efficient_attention_forward"),
    "cudnn": ("_scaled_dot_product_cudnn_attention",),
    "math": ("_scaled_dot_product_attention_math",),
}


def _sig(x: float, digits: int = 4) -> float:
    """x to ``digits`` significant digits (figures here span 1e-6 on a CPU smoke run to 1e3 on a GPU)."""
    return float(f"{x:.{digits}g}")


def _error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


class Budget:
    """Wall-clock budget for the optional (compile) measurements."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return None  # the process RSS high-water mark cannot be reset per measurement on CPU


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        peak = next((v for k, v in BF16_PEAK_TFLOPS if k in name), None)
        info.update(
            name=name,
            capability=list(torch.cuda.get_device_capability(device)),
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            bf16_peak_tflops_datasheet=peak,
        )
    else:
        info.update(name="cpu", threads=torch.get_num_threads(), bf16_peak_tflops_datasheet=None)
    return info


def measured_matmul_tflops(device: torch.device, dtype=torch.bfloat16) -> float:
    """Achievable dense GEMM throughput now: the MFU denominator when no datasheet peak is known (CPU, unknown GPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def sdpa_backends(fn, device: torch.device) -> dict[str, int]:
    """Run ``fn`` under the profiler; count the SDPA kernels per backend (flash, memory_efficient, cudnn, math)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    counts = {k: 0 for k in SDPA_KERNELS}
    for ev in prof.key_averages():
        for backend, names in SDPA_KERNELS.items():
            if any(n in ev.key for n in names):
                counts[backend] += ev.count
                break
    return {k: v for k, v in counts.items() if v}


# ---- generation --------------------------------------------------------------------------------------------------
def _generate_once(varsr, lr, device, seed: int) -> dict:
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        _, info = varsr.generate(
            lr,
            cfg=varsr.cfg.cfg,
            top_k=varsr.cfg.top_k,
            top_p=varsr.cfg.top_p,
            generator=torch.Generator(device=device).manual_seed(seed),
            return_info=True,
        )
    sync(device)
    return dict(info.timings(), total_s=time.perf_counter() - t0)


def _time_generate(varsr, cfg, device, batch: int, reps: int) -> dict:
    S = cfg.image_size
    lr = torch.rand(batch, 3, S, S, generator=torch.Generator().manual_seed(batch)).to(device)
    _generate_once(varsr, lr, device, 0)  # warm-up: kernel selection, allocator, compile
    reset_peak(device)
    runs = [_generate_once(varsr, lr, device, r + 1) for r in range(reps)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return dict(
        batch=batch,
        reps=reps,
        per_image_s={k: round(v / batch, 4) for k, v in med.items()},
        per_call_s=round(med["total_s"], 4),
        images_per_s=round(batch / med["total_s"], 3),
        peak_memory_mib=peak_mib(device),
    )


def compile_generation(varsr) -> list[str]:
    """torch.compile the generation hot spots in place: every transformer block (dynamic sequence length), the
    refiner's trunk and the VQVAE decoder. Returns what was compiled."""
    for blk in varsr.blocks:
        blk.compile(dynamic=True)
    net = varsr.diffloss.net
    net.trunk = torch.compile(net.trunk)
    varsr.vqvae.decoder.compile()
    return ["blocks (dynamic)", "refiner trunk", "vqvae decoder"]


def bench_generate(preset: str, device, batches: list[int], reps: int, try_compile: bool, budget: Budget) -> dict:
    cfg = VARSRConfig.preset(preset)
    torch.manual_seed(0)
    _, varsr = build(cfg, device=device)
    varsr.eval()
    out: dict = {"preset": preset, "dtype": "bf16 autocast", "eager": {}}
    for b in batches:
        out["eager"][f"batch_{b}"] = _time_generate(varsr, cfg, device, b, reps)
    S = cfg.image_size
    lr1 = torch.rand(1, 3, S, S).to(device)
    out["sdpa_backends"] = sdpa_backends(lambda: _generate_once(varsr, lr1, device, 0), device)
    if not try_compile:
        out["compiled"] = {"skipped": "compile not requested (--compile off; default on CUDA only)"}
    elif not budget.allows(120):
        out["compiled"] = {"skipped": f"time budget ({budget.elapsed():.0f} s used of {budget.seconds:.0f} s)"}
    else:
        try:
            t = time.perf_counter()
            what = compile_generation(varsr)
            _generate_once(varsr, lr1, device, 0)  # compiles
            comp: dict = {"compiled": what, "first_call_s": round(time.perf_counter() - t, 1)}
            for b in batches:
                comp[f"batch_{b}"] = _time_generate(varsr, cfg, device, b, reps)
                e = out["eager"][f"batch_{b}"]["per_image_s"]
                comp[f"batch_{b}"]["speedup_vs_eager"] = {
                    k: round(e[k] / v, 3) for k, v in comp[f"batch_{b}"]["per_image_s"].items() if v > 0
                }
            out["compiled"] = comp
        except Exception as exc:  # noqa: BLE001 - a failing compile is a result, not the end of the benchmark
            out["compiled"] = {"error": _error(exc)}
    varsr = None  # frees the model's GPU memory before the next benchmark (the closures above ran already)
    free(device)
    return out


# ---- training ----------------------------------------------------------------------------------------------------
def _conv_flops(conv: torch.nn.Conv2d, out_hw: int) -> float:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return 2.0 * k * conv.in_channels * conv.out_channels // conv.groups * out_hw


def train_flops_per_sample(cfg: VARSRConfig, varsr) -> float:
    """Model FLOPs of one training sample (forward + backward = 3 × forward) of the trainable transformer, LR encoder
    and refiner; the frozen VQVAE's tokenisation is data preparation and is not counted (it is timed separately).

    Matmuls count 2 FLOPs per multiply-add; attention counts only the query-key pairs the level mask lets through.
    """
    C, S, L, V = cfg.C, cfg.seq_len, cfg.L, cfg.vqvae.vocab_size
    hidden = round(C * cfg.mlp_ratio)
    per_token_block = 2 * C * (3 * C) + 2 * C * C + 2 * C * hidden * 2  # qkv, proj, fc1 + fc2
    lvl = varsr.level_ids("cpu")
    visible = int((lvl[None, :] <= lvl[:, None]).sum())  # (query, key) pairs of the block-causal mask
    attn = 2 * 2 * visible * C  # QKᵀ and AV over all heads
    fwd = cfg.depth * (S * per_token_block + attn) + L * 2 * C * V  # blocks + head over the L targets
    if varsr.con_embedding is not None:  # LR encoder convs at their output resolution
        side = cfg.image_size
        enc = varsr.con_embedding
        fwd += _conv_flops(enc.conv_in, side * side)
        for conv in enc.blocks:
            side //= conv.stride[0]
            fwd += _conv_flops(conv, side * side)
        fwd += _conv_flops(enc.conv_out, side * side)
    W, Cv = cfg.refiner_width, cfg.vqvae.z_channels
    rows = cfg.pn_last**2 * cfg.diffusion_batch_mul
    per_row = 2 * (
        256 * W + W * W + C * W + Cv * W + cfg.refiner_depth * (3 * W * W + 2 * W * W) + 2 * W * W + W * 2 * Cv
    )
    fwd += rows * per_row
    return 3.0 * fwd


class TrainBench:
    """A bf16 ZeRO-2 training step of one preset through the platform's DeepSpeed engine and ``train_step``."""

    def __init__(self, preset: str, device, batch: int, steps: int, warmup: int, peak_tflops: float):
        from training.config import TrainConfig

        self.preset, self.device, self.batch, self.steps, self.warmup = preset, device, batch, steps, warmup
        self.peak_tflops = peak_tflops
        self.mcfg = VARSRConfig.preset(preset)
        S = self.mcfg.image_size
        g = torch.Generator().manual_seed(0)
        self.sample = dict(
            hr=torch.rand(batch, 3, S, S, generator=g),
            lr=torch.rand(batch, 3, S, S, generator=g),
            label=torch.randint(0, self.mcfg.num_classes, (batch,), generator=g),
        )
        self.tcfg = TrainConfig(stage="isr", precision="bf16", zero_stage=2, device=device.type)
        self.tcfg.model.preset = preset
        self.tcfg.data.batch_size = batch
        self.tcfg.validate()

    def run(self, compile_model: bool) -> dict:
        from training import deepspeed_engine
        from training.schedule import Schedule
        from training.steps import StepSetup, train_step

        device, batch, mcfg = self.device, self.batch, self.mcfg
        torch.manual_seed(0)
        vqvae, varsr = build(mcfg, device=device)
        flops = train_flops_per_sample(mcfg, varsr)
        if compile_model:
            varsr.compile()
        engine, _, _, _ = deepspeed_engine.initialize(self.tcfg, varsr, Schedule(total_steps=10**6, warmup_steps=0))
        batches = itertools.repeat(self.sample)

        def step(i):
            return train_step(engine, vqvae, batches, StepSetup("isr", device, "bf16", nan_policy="skip"), step=i)

        t = time.perf_counter()
        for i in range(self.warmup):
            step(i)
        sync(device)
        first = time.perf_counter() - t
        reset_peak(device)
        res, wall = [], []
        for i in range(self.steps):
            sync(device)
            t = time.perf_counter()
            res.append(step(self.warmup + i))
            sync(device)
            wall.append(time.perf_counter() - t)
        step_s = statistics.median(wall)
        parts = {k: round(statistics.median(r.timings[k] for r in res), 4) for k in res[0].timings}
        model_tflops = flops * batch / step_s / 1e12
        peak_mem = peak_mib(device)
        backends = sdpa_backends(lambda: step(self.warmup + self.steps), device)
        out = dict(
            step_s=round(step_s, 4),
            step_parts_s=parts,
            warmup_s=round(first, 2),
            target_tokens_per_s=round(batch * mcfg.L / step_s, 1),
            sequence_tokens_per_s=round(batch * mcfg.seq_len / step_s, 1),
            model_tflops_per_step=_sig(flops * batch / 1e12),
            achieved_tflops=_sig(model_tflops),
            mfu=_sig(model_tflops / self.peak_tflops),
            loss=round(res[-1].loss, 4),
            peak_memory_mib=peak_mem,
            sdpa_backends=backends,
        )
        engine = varsr = vqvae = batches = None  # frees GPU memory; step() is not called after this
        free(device)
        return out


def bench_train(
    presets: list[str],
    device,
    batch: int,
    steps: int,
    warmup: int,
    try_compile: bool,
    budget: Budget,
    peak_tflops: float,
) -> dict:
    """Eager steps of every preset first, then the compiled variants while the time budget allows."""
    benches, out = {}, {}
    for p in presets:
        b, tried = batch, []
        while True:  # a batch that does not fit the card is halved (d24 at batch 8 needs ~80 GB without checkpointing)
            bench = TrainBench(p, device, b, steps, warmup, peak_tflops)
            try:
                eager = bench.run(False)
                break
            except torch.cuda.OutOfMemoryError:
                if b == 1:
                    raise
                tried.append(b)
            free(device)  # outside the except block: its traceback holds the failed run's engine and model
            b //= 2
        benches[p] = bench
        out[p] = {"preset": p, "batch": b, "precision": "bf16", "zero_stage": 2, "eager": eager}
        if tried:
            out[p]["out_of_memory_at_batch"] = tried
    for p, b in benches.items():
        if not try_compile:
            out[p]["compiled"] = {"skipped": "compile not requested (--compile off; default on CUDA only)"}
        elif not budget.allows(150):
            out[p]["compiled"] = {"skipped": f"time budget ({budget.elapsed():.0f} s used of {budget.seconds:.0f} s)"}
        else:
            try:
                comp = b.run(True)
                comp["speedup_vs_eager"] = round(out[p]["eager"]["step_s"] / comp["step_s"], 3)
                out[p]["compiled"] = comp
            except Exception as exc:  # noqa: BLE001 - a failing compile is a result, not the end of the benchmark
                out[p]["compiled"] = {"error": _error(exc)}
                free(device)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="d24", help="generation model (training: d16 and d24; 'tiny': tiny only)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--gen-batches", default="1,8")
    ap.add_argument("--gen-reps", type=int, default=None, help="timed generate calls per batch (default 5 GPU, 1 CPU)")
    ap.add_argument("--train-presets", default=None, help="comma list (default d16,d24; tiny with --preset tiny)")
    ap.add_argument("--train-batch", type=int, default=None, help="micro-batch (default 8 GPU, 2 CPU)")
    ap.add_argument("--train-steps", type=int, default=None, help="timed steps (default 5 GPU, 1 CPU)")
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="measure torch.compile variants (auto: on CUDA; on CPU inductor needs minutes per graph)",
    )
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip compile variants beyond this wall time")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (CPU runs)")
    args = ap.parse_args(argv)
    # ONE JSON object on stdout: libraries that print (DeepSpeed's op builder, its engine banner) go to stderr
    json_out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        result, rc = run(args)
    finally:
        sys.stdout.flush()
    json_out.write(json.dumps(result) + "\n")
    json_out.flush()
    return rc


def run(args) -> tuple[dict, int]:
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return {"error": "--device cuda but no CUDA device is visible (use --device cpu)"}, 2
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 tokeniser, as the training path runs it on GPU
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    budget = Budget(args.budget_s)
    try_compile = args.compile == "on" or (args.compile == "auto" and gpu)
    tiny = args.preset.endswith("tiny")
    train_presets = args.train_presets.split(",") if args.train_presets else ([args.preset] if tiny else ["d16", "d24"])
    info = device_info(device)
    measured = measured_matmul_tflops(device)
    peak = info.get("bf16_peak_tflops_datasheet") or measured
    result: dict = {
        "benchmark": "gpu_bench",
        "device_info": info,
        "measured_bf16_matmul_tflops": _sig(measured),
        "mfu_denominator_tflops": _sig(peak),
        "mfu_denominator": "datasheet dense bf16 peak"
        if info.get("bf16_peak_tflops_datasheet")
        else "measured bf16 GEMM throughput (no datasheet peak for this device)",
        "config": dict(
            preset=args.preset,
            gen_batches=args.gen_batches,
            train_presets=train_presets,
            compile=try_compile,
            budget_s=args.budget_s,
        ),
    }
    if not args.skip_generate:
        batches = [int(b) for b in args.gen_batches.split(",")]
        reps = args.gen_reps or (5 if gpu else 1)
        result["generate"] = bench_generate(args.preset, device, batches, reps, try_compile, budget)
    if not args.skip_train:
        from training import deepspeed_engine

        deepspeed_engine.ensure_dist_env()
        deepspeed_engine.init_distributed(device)
        batch = args.train_batch or (8 if gpu else 2)
        steps = args.train_steps or (5 if gpu else 1)
        result["train"] = bench_train(train_presets, device, batch, steps, args.train_warmup, try_compile, budget, peak)
    result["wall_s"] = round(budget.elapsed(), 1)
    return result, 0


if __name__ == "__main__":
    sys.exit(main())
