"""``flashtile bench --plot``: time and peak memory against sequence length, as a PNG (matplotlib)."""

from __future__ import annotations

import os

from ._util import MiB


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (it is optional: ``pip install 'flashtile[bench]'``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


#: How the plot's title names each method.
METHOD_TITLES = {"flashtile": "flashtile", "standard": "standard attention", "sdpa": "SDPA"}


def plot_title(meta: dict) -> str:
    """The plot's title: the methods that ran (``flashtile vs standard attention vs SDPA``, or fewer),
    the device, and the problem."""
    a = meta["args"]
    methods = " vs ".join(METHOD_TITLES.get(m, m) for m in dict.fromkeys(r["method"] for r in meta["rows"]))
    return (f"{methods} on {meta['device']}\n{a['dtype']}, batch {a['batch']}, heads {a['heads']}, "
            f"headdim {a['headdim']}, {'causal' if a['causal'] else 'not causal'}")  # fmt: skip


def plot_bench(meta: dict, path: str) -> None:
    """Time and peak memory against sequence length (log-log), one line per method and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = meta["rows"]
    colors = {"flashtile": "tab:blue", "standard": "tab:red", "sdpa": "tab:green"}
    styles = {"fwd": ("-", "o"), "fwd_bwd": ("--", "s")}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            rs = [r for r in rows if r["method"] == method and r["mode"] == mode]
            ok = [r for r in rs if r["status"] == "ok"]
            ls, mk = styles.get(mode, ("-", "o"))
            label = f"{method} {mode.replace('_', '+')}"
            color = colors.get(method)
            if ok:
                xs = [r["seqlen"] for r in ok]
                ax_t.plot(xs, [r["time_ms"] for r in ok], ls, marker=mk, color=color, label=label)
                ax_m.plot(xs, [max(r["peak_mem_bytes"], 1) / MiB for r in ok], ls, marker=mk, color=color,
                          label=label)  # fmt: skip
            for r in rs:
                if r["status"] != "ok" and not r.get("note", "").startswith(("oom at", "timeout at")):
                    for ax in (ax_t, ax_m):
                        ax.axvline(r["seqlen"], color=color, ls=":", lw=1)
                    ax_m.annotate(f"{method}\n{r['status']}", (r["seqlen"], 0.97), xycoords=("data", "axes fraction"),
                                  ha="center", va="top", fontsize=8, color=color)  # fmt: skip
    mem_top = max([r["peak_mem_bytes"] / MiB for r in rows if r["status"] == "ok"] or [0.0])
    if meta.get("max_mem_gb") and meta["max_mem_gb"] * 1024 < 10 * mem_top:  # the cap, when it is in view
        ax_m.axhline(meta["max_mem_gb"] * 1024, color="gray", ls=":", lw=1)
        ax_m.annotate("memory cap", (0.01, meta["max_mem_gb"] * 1024), xycoords=("axes fraction", "data"),
                      va="bottom", fontsize=8, color="gray")  # fmt: skip
    seqlens = sorted({r["seqlen"] for r in rows})
    for ax, title, unit in ((ax_t, "time", "ms"), (ax_m, "peak memory", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [f"{s // 1024}k" if s % 1024 == 0 else str(s) for s in seqlens])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(f"{title} ({unit})")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(plot_title(meta), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
