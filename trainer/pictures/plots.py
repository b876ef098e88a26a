"""loss.csv and loss.png."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..files.atomic import atomic_save, atomic_write_text

COLUMNS = ("step", "loss", "instance_loss", "prior_loss", "lr", "validation_loss")


def write_loss_csv(path: str | Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row.get(k), float) else row.get(k, "")) for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_loss_csv(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows.append({k: (int(v) if k == "step" else float(v)) for k, v in row.items() if v not in ("", None)})
    return rows


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def plot_loss(path: str | Path, rows: list[dict], title: str = "training loss") -> None:
    """Raw (faint) and EMA-smoothed instance and prior losses against optimizer steps, and the held-out images'
    validation loss (measured every N steps at fixed noise, so it needs no smoothing)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in rows]
    for key, color, label in (("instance_loss", "tab:blue", "instance"), ("prior_loss", "tab:orange", "prior (class)")):
        values = [r.get(key) for r in rows]
        pts = [(s, v) for s, v in zip(steps, values) if isinstance(v, float)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(
            xs, ema(list(ys), 0.95 if len(ys) > 100 else 0.8), color=color, linewidth=2, label=f"{label} (smoothed)"
        )
    validation = [(r["step"], r["validation_loss"]) for r in rows if isinstance(r.get("validation_loss"), float)]
    if validation:
        xs, ys = zip(*validation)
        ax.plot(xs, ys, color="tab:green", marker="o", markersize=3, linewidth=1.5, label="validation (held out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(loc="upper right")
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_pretrain_losses(path: str | Path, vae_losses: list[float], unet_losses: list[float]) -> None:
    """The two pretraining stages side by side, raw (faint) and EMA-smoothed, log scale."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5), dpi=90)
    stages = (("VAE reconstruction (L1 + MSE + block-mean L1)", vae_losses), ("UNet loss (min-SNR)", unet_losses))
    for i, (title, losses) in enumerate(stages):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(losses, alpha=0.3, lw=0.8)
        ax.plot(ema(list(losses), 1 - 2 / (max(1, len(losses) // 50) + 1)), lw=1.5)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.set_xlabel("step")
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
