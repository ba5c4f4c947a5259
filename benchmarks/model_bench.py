"""Model benchmark: one training step (tokenise + forward + backward + AdamW) and generate() latency per image.

Prints ONE JSON object: tokens/s and the step breakdown, generate latency split AR / refiner / VQVAE decode, peak
memory, and the config it ran. ``--research-geometry`` is issue 2's comparison config: patch_nums 1…32 at 512 px,
depth 4, width 256, heads 4, refiner 1024 × 6, the released VQVAE architecture.

    python benchmarks/model_bench.py --research-geometry --device cpu --dtype fp32 --threads 2

``--token-cache`` adds ``train_token_cache``: the training step with the shards' token cache against without it,
interleaved in this process (see :func:`token_cache_train_bench`); with ``--skip-train --skip-generate`` it runs alone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

# Shared 2-core machines: OpenMP threads that spin while waiting lose their core to other processes, which made
# 2-thread runs ~2.7x slower than 1-thread ones here. Passive waiting must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import VARSRConfig, build  # noqa: E402


def research_config() -> VARSRConfig:
    return VARSRConfig.preset("d24").replace(name="research-d4-w256", depth=4, embed_dim=256, num_heads=4,
                                             refiner_width=1024, refiner_depth=6)


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 3) -> float:
    """Machine calibration: fp32 GEMM throughput now (shared machines vary a lot; divide by it to compare runs)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
    cached = (torch.from_numpy(np.stack([a for a, _ in dec]).astype(np.int64)).to(hr.device),
              torch.from_numpy(np.stack([b for _, b in dec])).to(hr.device))

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
        order = arms[rnd % 3:] + arms[:rnd % 3]
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
        "batch": hr.shape[0], "timed_rounds": rounds,
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--research-geometry", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=2, help="training batch")
    ap.add_argument("--steps", type=int, default=2, help="timed training steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gen-batch", type=int, default=1, help="images per generate() call")
    ap.add_argument("--gen-calls", type=int, default=1, choices=range(1, 100), metavar="N", help="timed generate() calls (after one warm-up call)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--token-cache", action="store_true",
                    help="also time the training step with vs without the token cache (interleaved; --steps rounds)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "CUDA requested but not available"}))
        return 2
    cfg = research_config() if args.research_geometry else VARSRConfig.preset(args.preset)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    autocast = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    vqvae, varsr = build(cfg, device=dev)
    S, B = cfg.image_size, args.batch
    g = torch.Generator(device="cpu").manual_seed(0)
    hr = torch.rand(B, 3, S, S, generator=g).to(dev)
    lr = torch.rand(B, 3, S, S, generator=g).to(dev)
    label = torch.zeros(B, dtype=torch.long, device=dev)
    result = {"config": cfg.to_dict(), "device": args.device, "dtype": args.dtype, "threads": args.threads,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "torch": torch.__version__,
              "params_M": round(sum(p.numel() for p in varsr.parameters()) / 1e6, 3)}

    if not args.skip_train:
        varsr.train()
        opt = torch.optim.AdamW(varsr.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        scaler = torch.amp.GradScaler(dev.type, enabled=args.dtype == "fp16")
        times = []
        for step in range(args.warmup + args.steps):
            sync(); t0 = time.perf_counter(); c0 = time.process_time()
            with torch.no_grad():  # tokenise HR with the frozen VQVAE, fp32 (spec §5.3)
                idx_list, R = vqvae.img_to_idxBl(hr * 2 - 1)
                x_in = vqvae.idxBl_to_var_input(idx_list)
                gt = torch.cat(idx_list, dim=1)
            sync(); t1 = time.perf_counter(); c1 = time.process_time()
            with autocast():
                logits, diff = varsr(x_in, label, lr * 2 - 1, R)
                ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), gt.view(-1))
                loss = cfg.ce_weight * ce + cfg.diff_weight * diff
            sync(); t2 = time.perf_counter(); c2 = time.process_time()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(varsr.parameters(), 2.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sync(); t3 = time.perf_counter(); c3 = time.process_time()
            if step >= args.warmup:
                times.append((t1 - t0, t2 - t1, t3 - t2, c1 - c0, c2 - c1, c3 - c2))
        n = len(times)
        tok, fwd, bwd, ctok, cfwd, cbwd = (sum(t[i] for t in times) / n for i in range(6))
        step_s = tok + fwd + bwd
        cpu_s = ctok + cfwd + cbwd
        result["train"] = dict(batch=B, steps=n, step_s=round(step_s, 3), tokenise_s=round(tok, 3),
                               forward_s=round(fwd, 3), backward_step_s=round(bwd, 3),
                               target_tokens_per_s=round(B * cfg.L / step_s, 1), loss=round(loss.item(), 4),
                               cpu_s=dict(tokenise=round(ctok, 3), forward=round(cfwd, 3),
                                          backward_step=round(cbwd, 3), total=round(cpu_s, 3)))
        del opt, logits, loss

    if args.token_cache:
        result["train_token_cache"] = token_cache_train_bench(cfg, vqvae, varsr, hr, lr, label, rounds=args.steps,
                                                              autocast=autocast, sync=sync)

    if not args.skip_generate:
        varsr.eval()
        GB = args.gen_batch
        lr_g = torch.rand(GB, 3, S, S, generator=g).to(dev)
        timings = []
        for call in range(1 + args.gen_calls):
            with autocast():
                sync(); t0 = time.perf_counter(); c0 = time.process_time()
                varsr.generate(lr_g, cfg=cfg.cfg, top_k=cfg.top_k, top_p=cfg.top_p,
                               generator=torch.Generator(device=dev).manual_seed(call))
                sync(); total = time.perf_counter() - t0
            if call > 0:
                timings.append(dict(varsr.last_timings, total_s=total, cpu_s=time.process_time() - c0))
        n = len(timings)
        avg = {k: sum(t[k] for t in timings) / n / GB for k in timings[0]}
        result["generate"] = dict(batch=GB, calls=n, per_image_s=round(avg["total_s"], 3),
                                  ar_s=round(avg["ar_s"], 3), refiner_s=round(avg["refiner_s"], 3),
                                  decode_s=round(avg["decode_s"], 3), cpu_s=round(avg["cpu_s"], 3))
    # shared machines: wall time includes waiting for other processes; process CPU time does not
    result["load_average_1m"] = round(__import__("os").getloadavg()[0], 2)
    result["calibration_fp32_matmul_gflops"] = round(matmul_gflops(dev), 1)
    result["peak_memory_mb"] = round(peak_memory_mb(dev), 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
