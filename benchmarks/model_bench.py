"""Model benchmark: one training step (tokenise + forward + backward + AdamW) and generate() per image, split into
AR / refiner / VQVAE decode — today's code against a baseline commit, interleaved in one process.

Prints ONE JSON object with every figure and the config it ran. ``--research-geometry`` is the issues' comparison
config: patch_nums 1…32 at 512 px, depth 4, width 256, heads 4, refiner 1024 × 6, the released VQVAE architecture.

    python benchmarks/model_bench.py --research-geometry --threads 2 --reps 3   # train step + generate before/after
    python benchmarks/model_bench.py --preset tiny --skip-train                # generate before/after only
    python benchmarks/model_bench.py --research-geometry --token-cache --skip-generate --steps 2   # token cache

Generation before/after: the model package of ``--baseline-ref`` (default: the commit before this work, 508295d) is
extracted with ``git archive`` and imported under another module name. Both models get the same weights, the same LR
batch and the same random streams (greedy tokens, and the baseline's per-image refiner stream handed to today's code
as explicit per-image generators), so their images must agree (``max_abs_image_diff``, target <= 1e-4). The calls
alternate base/new (and new in the default inference dtype, when that is not fp32) within every repetition; the
JSON reports per-phase medians, the ratio of the medians and the median of the per-repetition ratios. Wall times on
a shared machine include waiting for other processes, so process CPU seconds are reported beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Shared 2-core machines: OpenMP threads that spin while waiting lose their core to other processes, which made
# 2-thread runs ~2.7x slower than 1-thread ones here. Passive waiting must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import VARSRConfig, build  # noqa: E402
from model.precision import default_inference_dtype  # noqa: E402

BASELINE_REF = "508295d"
PHASES = ("ar_s", "refiner_s", "decode_s", "total_s", "cpu_s", "ar_cpu_s", "refiner_cpu_s", "decode_cpu_s")


def research_config() -> VARSRConfig:
    return VARSRConfig.preset("d24").replace(
        name="research-d4-w256", depth=4, embed_dim=256, num_heads=4, refiner_width=1024, refiner_depth=6
    )


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 3) -> float:
    """Machine calibration: fp32 GEMM throughput now (shared machines vary a lot; divide by it to compare runs)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---- the baseline model package ---------------------------------------------------------------------------------
def import_baseline(ref: str, workdir: Path):
    """The ``model`` package of commit ``ref`` (git archive), imported as ``varsr_baseline_model``."""
    name = "varsr_baseline_model"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "model"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
    pkg = workdir / name
    (workdir / "model").rename(pkg)
    for f in pkg.glob("*.py"):  # absolute self-imports point at the renamed package
        f.write_text(re.sub(r"^(\s*)from model([. ])", rf"\1from {name}\2", f.read_text(), flags=re.M))
    sys.path.insert(0, str(workdir))
    return importlib.import_module(name)


def baseline_models(base, cfg: VARSRConfig, vqvae, varsr, device):
    """The baseline's (vqvae, varsr) for ``cfg`` holding the same weights as today's models."""
    known = {f for f in base.VARSRConfig.__dataclass_fields__}
    d = {k: v for k, v in cfg.to_dict().items() if k in known}
    # nested VQVAE fields added since the baseline (e.g. norm_groups) are left out when they hold the value the
    # baseline hard-codes (their default); another value would build a different model, so it is refused
    base_vq = importlib.import_module(f"{base.__name__}.config").VQVAEConfig
    known_vq = set(base_vq.__dataclass_fields__)
    today_vq = dataclasses.asdict(type(cfg.vqvae)())
    # (``init`` only chooses how a new model is initialised; the weights copied in below replace it)
    extra = {k: v for k, v in d["vqvae"].items() if k not in known_vq and k != "init"}
    if any(v != today_vq[k] for k, v in extra.items()):
        raise SystemExit(f"the baseline {base.__name__} cannot build vqvae fields {extra}: compare at their defaults")
    d["vqvae"] = {k: v for k, v in d["vqvae"].items() if k in known_vq}
    bcfg = base.VARSRConfig.from_dict(d)
    bvq, bvar = base.build(bcfg, device=device)
    bvq.load_state_dict(vqvae.state_dict())
    bvar.load_state_dict(varsr.state_dict())
    return bvq, bvar.eval()


# ---- generation --------------------------------------------------------------------------------------------------
def _baseline_streams(seed: int, batch: int, device) -> tuple[torch.Generator, list[torch.Generator]]:
    """The baseline seeds every image's generator with one seed drawn from generator(seed); the same streams as
    explicit per-image generators for today's generate()."""
    base_gen = torch.Generator(device=device).manual_seed(seed)
    drawn = int(
        torch.randint(0, 2**62, (1,), generator=torch.Generator(device=device).manual_seed(seed), device=device).item()
    )
    return base_gen, [torch.Generator(device=device).manual_seed(drawn) for _ in range(batch)]


class PhaseCPU:
    """Process CPU seconds spent inside the refiner sampler and the VQVAE decode of one model, measured from outside
    (instance-level wrappers), so the baseline and today's code are timed by the same instrument."""

    def __init__(self, varsr, vqvae):
        self.refiner = self.decode = 0.0
        varsr.diffloss.sample = self._wrap(varsr.diffloss.sample, "refiner")
        vqvae.fhat_to_img = self._wrap(vqvae.fhat_to_img, "decode")

    def _wrap(self, fn, attr):
        def timed(*a, **kw):
            c = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                setattr(self, attr, getattr(self, attr) + time.process_time() - c)

        return timed

    def reset(self) -> None:
        self.refiner = self.decode = 0.0


def _timed_generate(fn, device, cpu: PhaseCPU) -> tuple[torch.Tensor, dict]:
    cpu.reset()
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    img, phases = fn()
    _sync(device)
    total_cpu = time.process_time() - c0
    return img, dict(
        phases,
        total_s=time.perf_counter() - t0,
        cpu_s=total_cpu,
        refiner_cpu_s=cpu.refiner,
        decode_cpu_s=cpu.decode,
        ar_cpu_s=total_cpu - cpu.refiner - cpu.decode,
    )


def bench_generate_compare(
    cfg: VARSRConfig, device, dtype: torch.dtype, batch: int, reps: int, ref: str, seed: int = 0
) -> dict:
    """Interleaved generate() of the baseline and today's code (same weights/inputs/streams), per-phase times."""
    torch.manual_seed(0)
    vqvae, varsr = build(cfg, device=device)
    varsr.eval()
    S = cfg.image_size
    lr = torch.rand(batch, 3, S, S, generator=torch.Generator().manual_seed(seed)).to(device)
    kw = dict(cfg=cfg.cfg, top_k=1, top_p=cfg.top_p)  # greedy tokens: the released default
    auto_dtype = default_inference_dtype(device)
    with tempfile.TemporaryDirectory(prefix="varsr-baseline-") as tmp:
        base = import_baseline(ref, Path(tmp))
        bvq, bvar = baseline_models(base, cfg, vqvae, varsr, device)
        cpu = {"base": PhaseCPU(bvar, bvq), "new": PhaseCPU(varsr, vqvae)}

        def run_base(s):
            gen, _ = _baseline_streams(s, batch, device)
            with _autocast(device, dtype):
                img = bvar.generate(lr, generator=gen, **kw)
            return img, dict(bvar.last_timings)

        def run_new(s, dt=dtype):
            _, gens = _baseline_streams(s, batch, device)
            with _autocast(device, dt):
                img, info = varsr.generate(lr, generator=gens, return_info=True, **kw)
            return img, info.timings()

        runners = {"base": run_base, "new": run_new}
        if auto_dtype != dtype:
            runners[f"new_{str(auto_dtype).replace('torch.', '')}"] = lambda s: run_new(s, auto_dtype)
            cpu[list(runners)[-1]] = cpu["new"]
        for fn in runners.values():  # warm-up (allocator, oneDNN primitive caches), not timed
            fn(seed)
        times: dict[str, list[dict]] = {k: [] for k in runners}
        images: dict[str, torch.Tensor] = {}
        order = list(runners)
        for r in range(reps):
            for name in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
                img, t = _timed_generate(lambda name=name: runners[name](seed), device, cpu[name])
                times[name].append(t)
                images[name] = img.float().cpu()
        diff = float((images["new"] - images["base"]).abs().max())
        extra = {k: float((images[k] - images["new"]).abs().mean()) for k in images if k not in ("base", "new")}
    med = {k: {p: round(statistics.median(t[p] for t in v) / batch, 3) for p in PHASES} for k, v in times.items()}
    ratios = {}
    for k in times:
        if k == "base":
            continue
        ratios[k] = {
            p: dict(
                ratio_of_medians=round(med["base"][p] / med[k][p], 3) if med[k][p] > 0 else None,
                median_of_paired_ratios=round(
                    statistics.median(b[p] / n[p] for b, n in zip(times["base"], times[k]) if n[p] > 0), 3
                )
                if med[k][p] > 0
                else None,
            )
            for p in PHASES
        }
    return dict(
        batch=batch,
        reps=reps,
        baseline_ref=ref,
        dtype=str(dtype).replace("torch.", ""),
        per_image_median_s=med,
        speedup_vs_base=ratios,
        max_abs_image_diff_new_vs_base=diff,
        mean_abs_image_diff_vs_new_fp32=extra,
        note="ratios = base / new (> 1: faster); *_s wall seconds from generate's own timers; *cpu_s process "
        "CPU seconds (all threads), the steadier figure on a shared machine",
    )


def bench_generate(cfg: VARSRConfig, device, dtype: torch.dtype, batch: int, calls: int) -> dict:
    """Today's generate() alone (no baseline): per-phase seconds per image."""
    torch.manual_seed(0)
    vqvae, varsr = build(cfg, device=device)
    varsr.eval()
    cpu = PhaseCPU(varsr, vqvae)
    S = cfg.image_size
    lr = torch.rand(batch, 3, S, S, generator=torch.Generator().manual_seed(0)).to(device)
    out = []
    for call in range(1 + calls):

        def fn(call=call):
            with _autocast(device, dtype):
                img, info = varsr.generate(
                    lr,
                    cfg=cfg.cfg,
                    top_k=cfg.top_k,
                    top_p=cfg.top_p,
                    return_info=True,
                    generator=torch.Generator(device=device).manual_seed(call),
                )
            return img, info.timings()

        _, t = _timed_generate(fn, device, cpu)
        if call:
            out.append(t)
    return dict(
        batch=batch,
        calls=calls,
        dtype=str(dtype).replace("torch.", ""),
        per_image_median_s={p: round(statistics.median(t[p] for t in out) / batch, 3) for p in PHASES},
    )


# ---- training step -----------------------------------------------------------------------------------------------
def model_and_batch(cfg: VARSRConfig, device, batch: int):
    """(vqvae, varsr, hr, lr, label): seeded random weights and a random batch, the same for every training bench."""
    torch.manual_seed(0)
    vqvae, varsr = build(cfg, device=device)
    S = cfg.image_size
    g = torch.Generator(device="cpu").manual_seed(0)
    hr = torch.rand(batch, 3, S, S, generator=g).to(device)
    lr = torch.rand(batch, 3, S, S, generator=g).to(device)
    return vqvae, varsr, hr, lr, torch.zeros(batch, dtype=torch.long, device=device)


def bench_train(cfg: VARSRConfig, device, dtype: torch.dtype, batch: int, steps: int, warmup: int) -> dict:
    """One training step: tokenise HR with the frozen VQVAE (fp32), forward, backward, AdamW.

    ``--token-cache`` times the step with the shards' token cache beside it (:func:`bench_token_cache`).
    """
    vqvae, varsr, hr, lr, label = model_and_batch(cfg, device, batch)
    varsr.train()
    opt = torch.optim.AdamW(varsr.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    times = []
    for step in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        c0 = time.process_time()
        with torch.no_grad():  # tokenise HR with the frozen VQVAE, fp32
            idx_list, R = vqvae.img_to_idxBl(hr * 2 - 1)
            x_in = vqvae.idxBl_to_var_input(idx_list)
            gt = torch.cat(idx_list, dim=1)
        _sync(device)
        t1 = time.perf_counter()
        c1 = time.process_time()
        with _autocast(device, dtype):
            logits, diff = varsr(x_in, label, lr * 2 - 1, R)
            ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), gt.view(-1))
            loss = cfg.ce_weight * ce + cfg.diff_weight * diff
        _sync(device)
        t2 = time.perf_counter()
        c2 = time.process_time()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(varsr.parameters(), 2.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        c3 = time.process_time()
        if step >= warmup:
            times.append((t1 - t0, t2 - t1, t3 - t2, c1 - c0, c2 - c1, c3 - c2))
    n = len(times)
    tok, fwd, bwd, ctok, cfwd, cbwd = (sum(t[i] for t in times) / n for i in range(6))
    step_s = tok + fwd + bwd
    return dict(
        batch=batch,
        steps=n,
        dtype=str(dtype).replace("torch.", ""),
        step_s=round(step_s, 3),
        tokenise_s=round(tok, 3),
        forward_s=round(fwd, 3),
        backward_step_s=round(bwd, 3),
        target_tokens_per_s=round(batch * cfg.L / step_s, 1),
        loss=round(loss.item(), 4),
        cpu_s=dict(
            tokenise=round(ctok, 3),
            forward=round(cfwd, 3),
            backward_step=round(cbwd, 3),
            total=round(ctok + cfwd + cbwd, 3),
        ),
    )


# ---- training step with / without the token cache (issue 12) -------------------------------------------------------
def token_cache_train_bench(cfg: VARSRConfig, vqvae, varsr, hr, lr, label, *, rounds: int, autocast, sync) -> dict:
    """The training step (tokenise + forward + backward + clip + AdamW) three ways, interleaved round by round in
    this process on the same model, optimiser and batch (arm order rotates every round):

    * ``main``: today's main path: the frozen VQVAE tokenises the whole batch in one call, then the step;
    * ``on_the_fly``: this code without a cache: ``compute_loss`` tokenises per sample (``model.losses.tokenize_hr``);
    * ``cache``: ``compute_loss`` with the batch's cached tokens and residual (what the token shards hold; reading
      them is the data loader's work, measured apart as ``cache_member_decode_ms_per_sample``).

    Round 0 is the warm-up: every arm starts from the same weights and optimiser state there, and their losses are
    compared (``on_the_fly`` and ``cache`` must agree bit for bit). Figures are medians of the timed rounds."""
    import copy
    import io
    import statistics

    import numpy as np

    from model.losses import compute_loss, tokenize_hr
    from training.steps import TimedTokenizer

    # the cache entries exactly as `varsr data tokenize` writes them (int16/int32 indices, float32 residual)
    idx_list, R = tokenize_hr(vqvae, hr)
    idx = torch.cat(idx_list, 1)
    members = []
    for i in range(hr.shape[0]):
        t, r = io.BytesIO(), io.BytesIO()
        np.save(t, idx[i].cpu().numpy().astype(np.int16 if cfg.vqvae.vocab_size <= 32768 else np.int32))
        np.save(r, R[i].cpu().numpy())
        members.append((t.getvalue(), r.getvalue()))
    t0 = time.perf_counter()
    dec = [(np.load(io.BytesIO(a)), np.load(io.BytesIO(b))) for a, b in members]
    decode_ms = (time.perf_counter() - t0) * 1000 / len(members)
    cached = (
        torch.from_numpy(np.stack([a for a, _ in dec]).astype(np.int64)).to(hr.device),
        torch.from_numpy(np.stack([b for _, b in dec])).to(hr.device),
    )

    varsr.train()
    opt = torch.optim.AdamW(varsr.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def step(arm: str, seed: int) -> tuple[float, float, float]:
        tok = TimedTokenizer(vqvae, sync)
        gen = torch.Generator(device=hr.device).manual_seed(seed)
        sync()
        t0 = time.perf_counter()
        if arm == "main":
            il, Rm = tok.img_to_idxBl(hr.float() * 2 - 1)
            tokens = (torch.cat(il, 1), Rm)
        else:
            tokens = cached if arm == "cache" else None
        with autocast():
            out = compute_loss(tok, varsr, hr, lr, label, generator=gen, tokens=tokens)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(varsr.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, tok.seconds, out.loss.item()

    arms = ["main", "on_the_fly", "cache"]
    times: dict[str, list[tuple[float, float]]] = {a: [] for a in arms}
    warm_loss: dict[str, float] = {}
    start = (copy.deepcopy(varsr.state_dict()), copy.deepcopy(opt.state_dict()))
    for rnd in range(1 + rounds):
        order = arms[rnd % 3 :] + arms[: rnd % 3]
        for arm in order:
            if rnd == 0:  # warm-up: same start for every arm, losses compared
                varsr.load_state_dict(start[0])
                opt.load_state_dict(copy.deepcopy(start[1]))
            wall, tok_s, loss = step(arm, seed=rnd)
            if rnd == 0:
                warm_loss[arm] = loss
            else:
                times[arm].append((wall, tok_s))
    med = {a: (statistics.median(w for w, _ in v), statistics.median(t for _, t in v)) for a, v in times.items()}
    return {
        "batch": hr.shape[0],
        "timed_rounds": rounds,
        "step_s": {a: round(m[0], 3) for a, m in med.items()},
        "tokenise_s": {a: round(m[1], 3) for a, m in med.items()},  # cache: the teacher-forcing input only
        "all_step_s": {a: [round(w, 3) for w, _ in v] for a, v in times.items()},
        "speedup_cache_vs_main": round(med["main"][0] / med["cache"][0], 3),
        "speedup_cache_vs_on_the_fly": round(med["on_the_fly"][0] / med["cache"][0], 3),
        "on_the_fly_vs_main_step": round(med["on_the_fly"][0] / med["main"][0], 3),
        "warmup_loss": warm_loss,
        "loss_cache_equals_on_the_fly_bitwise": warm_loss["cache"] == warm_loss["on_the_fly"],
        "cache_bytes_per_sample": sum(len(a) + len(b) for a, b in members) // len(members),
        "cache_member_decode_ms_per_sample": round(decode_ms, 3),
        "issue_12_target": "fp32 step with the cache >= 1.3x main (30.2 s -> under 23.4 s on the reference machine)",
    }


def bench_token_cache(cfg: VARSRConfig, device, dtype: torch.dtype, batch: int, rounds: int) -> dict:
    """The token-cache comparison on the same random batch and model as :func:`bench_train`."""
    vqvae, varsr, hr, lr, label = model_and_batch(cfg, device, batch)
    return token_cache_train_bench(
        cfg,
        vqvae,
        varsr,
        hr,
        lr,
        label,
        rounds=rounds,
        autocast=lambda: _autocast(device, dtype),
        sync=lambda: _sync(device),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--research-geometry", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="the precision of the before/after comparison (fp32: the issue's target)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", "--gen-calls", type=int, default=3, help="interleaved before/after repetitions")
    ap.add_argument("--gen-batch", type=int, default=1, help="images per generate() call")
    ap.add_argument(
        "--baseline-ref",
        default=BASELINE_REF,
        help="git commit whose model package is the 'before' (use 'none' to time today's code alone)",
    )
    ap.add_argument(
        "--lr-encoder-hidden",
        type=int,
        default=None,
        help="override the LR encoder's last width; the comparison defaults to C, the only width the "
        "baseline can build (the released code uses 1536)",
    )
    ap.add_argument("--skip-train", action="store_true", help="do not time the training step")
    ap.add_argument("--batch", type=int, default=2, help="training batch")
    ap.add_argument("--steps", type=int, default=2, help="timed training steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument(
        "--token-cache",
        action="store_true",
        help="also time the training step with vs without the token cache (interleaved; --steps rounds)",
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "CUDA requested but not available"}))
        return 2
    cfg = research_config() if args.research_geometry else VARSRConfig.preset(args.preset)
    compare = args.baseline_ref.lower() != "none" and not args.skip_generate
    hidden = args.lr_encoder_hidden if args.lr_encoder_hidden is not None else (cfg.C if compare else None)
    if hidden is not None and cfg.variant == "isr":
        cfg = cfg.replace(lr_encoder_hidden=hidden)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result = {
        "config": cfg.to_dict(),
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "default_inference_dtype": str(default_inference_dtype(dev)).replace("torch.", ""),
        "load_average_1m_start": round(os.getloadavg()[0], 2),
    }
    if not args.skip_generate:
        if compare:
            result["generate"] = bench_generate_compare(cfg, dev, dtype, args.gen_batch, args.reps, args.baseline_ref)
        else:
            result["generate"] = bench_generate(cfg, dev, dtype, args.gen_batch, args.reps)
    if not args.skip_train:
        result["train"] = bench_train(cfg, dev, dtype, args.batch, args.steps, args.warmup)
    if args.token_cache:
        result["train_token_cache"] = bench_token_cache(cfg, dev, dtype, args.batch, args.steps)
    # shared machines: wall time includes waiting for other processes; process CPU time does not
    result["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    result["calibration_fp32_matmul_gflops"] = round(matmul_gflops(dev), 1)
    result["peak_memory_mb"] = round(peak_memory_mb(dev), 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
