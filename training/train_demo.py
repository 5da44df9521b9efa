"""Train glmv's demo model (GLM-4.1V architecture, ~9.3 M parameters) on synthetic documents.

    python -m training.train_demo --out runs/demo --time-budget 450          # on a GPU
    python -m training.train_demo --out /tmp/t --max-steps 3 --workers 1 --device cpu --tokens 3000  # smoke run

Writes into `--out`: `checkpoint/` (the skeleton from `training.demo_checkpoint` plus bf16 weights),
`state.pt` (model, optimiser, step and elapsed time: `--resume` continues from it), `log.jsonl`
(loss per logged step), `loss.png`, and, unless `--eval-seconds 0`, `eval.json` from
`training.evaluate`'s held-out set graded with transformers on the training device.

Documents are rendered on the fly by `--workers` DataLoader processes; each gives up to three
sequences. Each worker groups its sequences by length into padded batches of at most `--tokens`
text tokens and `--patches` image patches, so the training process receives whole batches. The learning
rate warms up over `--warmup` steps and then follows a cosine over the time budget (or the step
budget), so a run ends on schedule on any machine. Seeds are fixed by `--seed`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from glmv.processing.image import ImageProcessor
from training.data import BatchStream, DocumentStream, PackedBatch
from training.demo_checkpoint import save_weights, write_skeleton
from training.model import (
    Batch,
    MergerTap,
    common_share,
    glyph_loss,
    hidden_states,
    install_cached_position_embeddings,
    install_padded_vision_attention,
)


def load_weights(model: Any, folder: Path) -> None:
    """Copy a checkpoint folder's safetensors (one file or shards) into `model` (tied lm_head kept)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"--init-from {folder}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _task_weights(text: str) -> dict[str, float]:
    from glmv.synth.tasks import TASK_WEIGHTS

    weights: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in TASK_WEIGHTS:
            raise argparse.ArgumentTypeError(
                f"unknown task {name.strip()!r}; tasks: {', '.join(TASK_WEIGHTS)}"
            )
        weights[name.strip()] = float(value)
    return weights


def _in_patch_embedding(name: str) -> bool:
    """Whether a parameter belongs to the vision tower's patch embedding (its own `--patch-lr`)."""
    return name.startswith("model.visual.patch_embed.")


def _keep(item: Any) -> Any:
    return item


def _log(msg: str) -> None:
    print(msg, flush=True)


def plot_loss(log_path: Path, out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        _log(f"{out.name} not drawn: matplotlib is not installed (pip install -e '.[train]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="all", lw=1.2)
    for task in ("extract", "qa", "read"):
        pts = [(r["step"], r[f"loss_{task}"]) for r in rows if r.get(f"loss_{task}") is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=task, lw=0.8, alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per answer token")
    ax.set_title("glmv demo model: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.train_demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--skeleton",
        type=Path,
        help="reuse this checkpoint skeleton (tokenizer, configs) instead of building one",
    )
    p.add_argument(
        "--time-budget", type=float, default=450.0, help="seconds of training (the schedule follows it)"
    )
    p.add_argument(
        "--max-steps", type=int, default=0, help="stop after this many steps (0: time budget only)"
    )
    p.add_argument("--tokens", type=int, default=65536, help="padded tokens per batch")
    p.add_argument("--patches", type=int, default=65536, help="image patches per batch at most (0: no limit)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--stop-at",
        type=float,
        default=0.0,
        help="save and exit after this many seconds of this invocation, mid-schedule (0: never); "
        "--resume continues the same schedule",
    )
    p.add_argument(
        "--lines-share",
        type=float,
        default=0.0,
        help="share of the images that are short text strips to transcribe (glmv.synth.lines)",
    )
    p.add_argument(
        "--task-weights",
        type=_task_weights,
        default=None,
        help="task mix, e.g. extract=0.35,qa=0.35,read=0.27,extract_other=0.03 "
        "(default: glmv.synth.tasks.TASK_WEIGHTS)",
    )
    p.add_argument("--save-every", type=float, default=120.0, help="seconds between state.pt saves")
    p.add_argument("--shard-mb", type=float, default=12.0, help="split weight files above this size")
    p.add_argument(
        "--eval-seconds",
        type=float,
        default=90.0,
        help="time for the held-out check after training (0: none)",
    )
    p.add_argument(
        "--eval-scale", type=float, default=1.0, help="fraction of the default held-out set to grade"
    )
    p.add_argument(
        "--eval-max-new", type=int, default=0, help="cap on generated tokens in that check (0: none)"
    )
    p.add_argument(
        "--init-from",
        type=Path,
        help="start from the weights of this checkpoint folder (same shapes and tokenizer)",
    )
    p.add_argument(
        "--fresh-vision",
        action="store_true",
        help="with --init-from: keep its language model but start the vision tower from a new "
        "initialisation (for weights whose image embeddings have collapsed: see `vision_spread`)",
    )
    p.add_argument(
        "--patch-lr",
        type=float,
        default=1.0,
        help="the patch embedding's learning rate as a multiple of --lr. Its 1,176 inputs are nearly "
        "all the same on paper, so Adam's equal-sized steps add up: at the full rate its output "
        "becomes one large vector for every patch within a hundred steps, and the text on the page "
        "is lost after the next normalisation",
    )
    p.add_argument(
        "--center-weight",
        type=float,
        default=0.0,
        help="weight of a penalty on the image embeddings' common part, "
        "||mean x||^2 / mean ||x||^2 over the batch's image tokens: without it the language "
        "model's gradient, the same for every image token, grows one shared vector until it "
        "drowns what each token shows (0: off)",
    )
    p.add_argument(
        "--glyph-weight",
        type=float,
        default=0.0,
        help="weight of the per-token reading loss (training.model.glyph_loss): each image token "
        "is taught which printed characters lie under it, so the vision tower learns to read "
        "from the first step instead of waiting for the language model's weak, shared gradient (0: off)",
    )
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of three steps")
    p.add_argument("--profile-start", type=int, default=20, help="first profiled step")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device(args.device)
    out: Path = args.out
    ckpt = out / "checkpoint"
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m training.train_demo " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.skeleton:
        if ckpt.resolve() != args.skeleton.resolve():
            shutil.copytree(args.skeleton, ckpt, dirs_exist_ok=True)
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg.setdefault("glmv_demo_model", {})["command"] = command
        (ckpt / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    elif not (ckpt / "tokenizer.json").is_file():
        _log("building the tokenizer and configs ...")
        write_skeleton(ckpt, command=command)

    if device.type == "cuda":
        # Sequence lengths change every batch, and cuDNN's attention builds a new plan for each
        # shape on the CPU (about 0.3 s of a 0.31 s step on the H200, where the GPU works 0.07 s):
        # flash / memory-efficient attention need no plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
    from transformers import AutoConfig, Glm4vForConditionalGeneration

    config = AutoConfig.from_pretrained(ckpt)
    config._attn_implementation = "sdpa"
    model = Glm4vForConditionalGeneration(config).to(device)
    install_padded_vision_attention(model)
    install_cached_position_embeddings(model)
    if args.init_from and not (args.resume and (out / "state.pt").is_file()):
        fresh_vision = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
        load_weights(model, args.init_from)
        if args.fresh_vision:
            model.model.visual.load_state_dict(fresh_vision)
        _log(f"weights from {args.init_from}" + (" (vision tower new)" if args.fresh_vision else ""))
    tap = MergerTap(model)
    n_params = sum(t.numel() for t in model.parameters())
    _log(f"model: {n_params / 1e6:.2f} M parameters on {device}")
    groups = []
    for patch, scale in ((False, 1.0), (True, args.patch_lr)):
        named = [(n, t) for n, t in model.named_parameters() if _in_patch_embedding(n) == patch]
        for decay in (True, False):
            params = [t for _, t in named if (t.ndim >= 2) == decay]
            if params:
                groups.append(
                    {
                        "params": params,
                        "weight_decay": args.weight_decay if decay else 0.0,
                        "lr_scale": scale,
                    }
                )
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        groups,
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=fused,
    )
    step, elapsed = 0, 0.0
    state_path = out / "state.pt"
    log_path = out / "log.jsonl"
    if args.resume and state_path.is_file():
        state = torch.load(state_path, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        _log(f"resumed at step {step} ({elapsed:.0f} s trained)")
    elif log_path.exists():
        log_path.unlink()

    image_id = int(config.image_token_id)
    pad_id = int(config.text_config.pad_token_id or 0)
    processor = ImageProcessor.from_pretrained(ckpt)
    stream = BatchStream(
        DocumentStream(
            ckpt, seed=args.seed, start=step, task_weights=args.task_weights, lines_share=args.lines_share
        ),
        pad_id=pad_id,
        max_tokens=args.tokens,
        max_patches=args.patches,
        pool_docs=96 if device.type == "cuda" else 4,
    )
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=args.workers,
        collate_fn=_keep,  # numpy arrays through the worker pipes: no shared-memory tensors
        prefetch_factor=4 if args.workers else None,
        persistent_workers=bool(args.workers),
    )
    feed = iter(loader)
    amp = device.type == "cuda"
    model.train()

    def lr_at(step: int, frac: float) -> float:
        warm = min(1.0, (step + 1) / args.warmup)
        return args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    def progress() -> float:
        fracs = [elapsed / args.time_budget] if args.time_budget > 0 else []
        if args.max_steps:
            fracs.append(step / args.max_steps)
        return max(fracs) if fracs else 1.0

    from tqdm import tqdm

    bar = tqdm(total=100, desc="train", unit="%", mininterval=5, file=sys.stdout)
    last_save = time.monotonic()
    started = time.monotonic()
    paused = False
    task_index = {"extract": 0, "extract_other": 0, "qa": 1, "read": 2}
    # loss sums and token counts per task (extract, qa, read) and of the batch means, kept on the
    # device and read every 25 steps, so the loop does not wait on the GPU each step
    sums = torch.zeros(3, device=device)
    counts = torch.zeros(3, device=device)
    batch_loss = torch.zeros((), device=device)
    glyph_sums = torch.zeros(2, device=device)  # reading loss and accuracy per image token
    n_logged = 0
    seen_tokens = 0
    wait_time = 0.0
    profiler: Any = None
    while progress() < 1.0 and not paused:
        if args.profile and step == args.profile_start:
            profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]
                + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
            )
            profiler.__enter__()
        if profiler is not None and step == args.profile_start + 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            profiler.__exit__(None, None, None)
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            _log(profiler.key_averages().table(sort_by=sort, row_limit=25))
            profiler = None
        t0 = time.monotonic()
        packed: PackedBatch = next(feed)
        t_data = time.monotonic()
        wait_time += t_data - t0
        batch = Batch.from_packed(packed, processor, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress()) * group["lr_scale"]
        tap.armed = (step + 1) % 25 == 0  # the step that is logged next
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            hidden = hidden_states(model, batch.ids, batch.positions, batch.rows, batch.grids, image_id)
            select = batch.targets[:, 1:]
            h = hidden[:, :-1][select]
            logits = model.lm_head(h).float()
        labels = batch.ids[:, 1:][select]
        token_loss = F.cross_entropy(logits, labels, reduction="none")
        loss = token_loss.mean()
        total = loss
        if args.center_weight > 0 and tap.output is not None:
            total = total + args.center_weight * common_share(tap.output)
        if args.glyph_weight > 0 and tap.output is not None and batch.glyphs is not None:
            g_loss, g_acc = glyph_loss(tap.output, batch.glyphs, model.lm_head.weight)
            total = total + args.glyph_weight * g_loss
            glyph_sums += torch.stack((g_loss.detach(), g_acc))
        tap.output = None
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen_tokens += int(batch.ids.numel())
        with torch.no_grad():
            rows = torch.tensor([task_index[t] for t in batch.tasks], device=device)
            token_task = rows.unsqueeze(1).expand_as(select)[select]
            sums.scatter_add_(0, token_task, token_loss.detach())
            counts.scatter_add_(0, token_task, torch.ones_like(token_loss))
            batch_loss += loss.detach()
            n_logged += 1
        elapsed += time.monotonic() - t0
        paused = bool(args.stop_at) and time.monotonic() - started > args.stop_at
        if step % 25 == 0 or progress() >= 1.0 or paused:
            per_task = (sums / counts.clamp(min=1)).tolist()
            have = counts.tolist()
            row: dict[str, Any] = {
                "step": step,
                "elapsed": round(elapsed, 1),
                "lr": opt.param_groups[0]["lr"],
                "loss": float(batch_loss) / max(1, n_logged),
                "batch": len(batch.tasks),
                "tokens_per_s": round(seen_tokens / max(elapsed, 1e-6)),
                "data_wait_s": round(wait_time, 1),
                "vision_spread": tap.spread,
                "vision_norm": tap.norm,
            }
            for i, task in enumerate(("extract", "qa", "read")):
                row[f"loss_{task}"] = per_task[i] if have[i] else None
            if args.glyph_weight > 0:
                g_loss_mean, g_acc_mean = (glyph_sums / max(1, n_logged)).tolist()
                row["glyph_loss"], row["glyph_acc"] = round(g_loss_mean, 4), round(g_acc_mean, 4)
                glyph_sums.zero_()
            sums.zero_()
            counts.zero_()
            batch_loss.zero_()
            n_logged = 0
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}", step=step)
            if step % 100 == 0:
                _log(json.dumps(row))
        bar.n = min(100, int(100 * progress()))
        if step % 25 == 0:
            bar.refresh()
        if time.monotonic() - last_save > args.save_every:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "elapsed": elapsed,
                },
                state_path,
            )
            save_weights(model.state_dict(), ckpt, shard_bytes=int(args.shard_mb * 2**20))
            last_save = time.monotonic()
    bar.close()
    _log(
        f"trained {step} steps in {elapsed:.0f} s ({seen_tokens / max(elapsed, 1e-6):.0f} padded tokens/s, "
        f"{wait_time:.0f} s waiting for data)"
    )
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed},
        state_path,
    )
    save_weights(model.state_dict(), ckpt, shard_bytes=int(args.shard_mb * 2**20))
    plot_loss(log_path, out / "loss.png")
    if paused:
        _log(f"paused at {100 * progress():.0f} % of the schedule; --resume continues it")
        return 0
    summary = {
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "parameters": n_params,
        "final_loss": json.loads(log_path.read_text().splitlines()[-1])["loss"],
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "command": command,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _log(json.dumps(summary))
    del loader, feed

    if args.eval_seconds > 0:
        from training.evaluate import eval_items, report, run_hf, score

        model.eval()
        s = args.eval_scale
        items = eval_items(
            max(1, round(48 * s)), max(1, round(16 * s)), max(5, round(160 * s)), max(1, round(35 * s))
        )
        t0 = time.monotonic()
        dtype = "bfloat16" if amp else "float32"
        answers = run_hf(
            items,
            model,
            str(ckpt),
            str(device),
            dtype,
            deadline=time.monotonic() + args.eval_seconds,
            max_new_cap=args.eval_max_new or None,
        )
        # items whose batch was never started (deadline) are left out of the scores
        done = [i for i, a in enumerate(answers) if a is not None]
        meta = {
            "backend": "hf",
            "dtype": dtype,
            "device": str(device),
            "items": len(items),
            "seconds": round(time.monotonic() - t0, 1),
        }
        report(
            score([items[i] for i in done], [answers[i] or "" for i in done]),
            [items[i] for i in done],
            [answers[i] or "" for i in done],
            meta,
            out / "eval.json",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
