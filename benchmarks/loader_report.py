"""The loader benchmark's report: the results table, the store builds, RSS vs corpus size, versions
(markdown, as written to OUT/results.md by ``benchmarks.bench_loader``)."""

from __future__ import annotations

import os
import subprocess
import time

from benchmarks.peer_envs import ROOT

# ----------------------------------------------------------------------------- table


def _fmt_int(x) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _fmt_gb(mb) -> str:
    return "—" if mb is None else f"{mb / 1024:.2f} GB"


def _tree_mb(res: dict) -> float | None:
    """Peak RSS of the loader and its workers together: the sampled sum, but never below the main
    process's own high-water mark (a run shorter than the 50 ms sampling period is still right)."""
    vals = [v for v in (res.get("peak_tree_mb"), res.get("maxrss_self_mb")) if v]
    return max(vals) if vals else None


def _one_mb(res: dict) -> float | None:
    return max(res.get("maxrss_self_mb") or 0, res.get("maxrss_children_mb") or 0) or None


def table(rows: list[dict]) -> str:
    head = ("| loader | store | output | workers | cells | cells/s | first batch | peak RSS (all procs) "
            "| max RSS (one proc) | shuffle quality | status |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        res = r["result"]
        st = res.get("status", "?")
        ok = st.startswith("ok")
        q = res.get("shuffle_quality")
        one = _one_mb(res)
        lines.append("| " + " | ".join([
            r["loader"], r["store"], r["output"], r["workers"],
            _fmt_int(res.get("cells")) if ok else "—",
            f"**{res['cells_per_s']:,.0f}**" if ok and res.get("cells_per_s") else "—",
            f"{res['first_batch_s']:.2f} s" if ok and res.get("first_batch_s") is not None else "—",
            _fmt_gb(_tree_mb(res)) if ok else "—",
            _fmt_gb(one) if ok else "—",
            f"{q:.3f}" if (ok and q is not None) else "—",
            st.replace("|", "/")[:160],
        ]) + " |")
    return "\n".join(lines)



def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=False,
                             capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "data_loader", "sharding"], cwd=ROOT,
                               check=False, capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + (" (data_loader/ or sharding/ modified)" if dirty else "")
    except OSError:
        return "?"


def _builds_table(builds: dict) -> list[str]:
    L = ["| store | seconds | cells/s | peak RSS | size on disk | status |", "|---|---|---|---|---|---|"]
    for name, b in builds.items():
        ok = str(b.get("status")).startswith("ok")
        secs = b.get("seconds") if ok else None
        rate = f"{b['cells'] / secs:,.0f}" if secs else "—"
        size = f"{(b.get('bytes') or 0) / 2**30:.2f} GB" if ok else "—"
        secs_s = f"{secs:,.1f}" if secs else "—"
        peak = _fmt_gb(b.get("peak_tree_mb"))
        L.append(f"| {name} | {secs_s} | {rate} | {peak} | {size} | {b.get('status')} |")
    return L


def _rss_table(a, rss_rows: list[dict]) -> list[str]:
    L = ["", (f"### Our loader's peak RSS vs corpus size ({a.rss_batches} batches of {a.batch_size:,} "
         "read from each)"), "",
         ("| backend | workers | corpus cells | peak RSS (all procs) | max RSS (one proc) | first batch "
         "| status |"),
         "|---|---|---|---|---|---|---|"]
    by: dict = {}
    for r in rss_rows:
        res = r["result"]
        first = f"{res['first_batch_s']:.2f} s" if res.get("first_batch_s") is not None else "—"
        L.append(f"| {r['backend']} | {r['workers']} | {r['corpus_cells']:,} | {_fmt_gb(_tree_mb(res))} "
                 f"| {_fmt_gb(_one_mb(res))} | {first} | {res.get('status')} |")
        if str(res.get("status")).startswith("ok"):
            by.setdefault((r["backend"], r["workers"]), []).append((r["corpus_cells"], _one_mb(res)))
    for (b, w), v in by.items():
        if len(v) >= 2:
            v.sort()
            L.append(f"\n{b}, {w} workers: max RSS x{v[-1][1] / v[0][1]:.2f} from {v[0][0]:,} to "
                     f"{v[-1][0]:,} cells (target: <= 1.10)")
    return L


def report(a, src, measure, rows, builds, rss_rows, venvs, profiles, total_s) -> str:
    import platform

    L = [(f"## Loader benchmark: {src['n_cells']:,} cells x {src['n_genes']:,} genes, "
         f"{src['nnz_per_cell']:,.0f} nnz/cell, stored sorted by cell type; batch {a.batch_size:,}"),
         "",
         (f"Machine: {os.cpu_count()} cores, {platform.platform()}. Warm page cache (each store read once "
         f"before its run); each loader in its own process, warmed up on a throw-away instance; "
         f"{measure:,} cells timed per loader (one pass)."),
         f"Commit {_git_rev()}; {time.strftime('%Y-%m-%d %H:%M')}; whole benchmark {total_s / 60:.1f} min.",
         "", table(rows), "",
         ("cells/s: cells delivered / seconds from asking for the first batch to receiving the last (the "
         "pass's start-up, e.g. DataLoader workers, and its first fetch included). peak RSS (all procs): "
         "the loader process and its workers together (sampled). max RSS (one proc): kernel high-water "
         "mark of the largest single process. shuffle quality: mean batch label entropy / entropy of a "
         "random batch of the same size (1.0 = perfect)."), "",
         "### Store builds", ""]
    L += _builds_table(builds)
    if rss_rows:
        L += _rss_table(a, rss_rows)
    L += ["", "### Versions", ""]
    ours = next((r["result"].get("versions") for r in rows
                 if r["group"] == "ours" and r["result"].get("versions")), None)
    L.append(f"- ours: scpretrain {_git_rev()}" + ("; " + ", ".join(f"{k} {v}" for k, v in ours.items())
                                                    if ours else ""))
    for name, v in venvs.items():
        L.append(f"- venv-{name}: " + (", ".join(f"{k} {x}" for k, x in v.versions.items()) if v.python
                                       else f"unavailable: {v.reason}"))
    ceil = next((r["result"].get("versions") for r in rows if r["group"] == "ceilings"
                 and r["result"].get("versions")), None)
    if ceil:
        L.append("- ceilings (project venv): " + ", ".join(f"{k} {x}" for k, x in ceil.items()))
    for backend, txt in profiles.items():
        body = [ln for ln in txt.strip().splitlines() if ".prof" not in ln]
        L += ["", f"### cProfile: our loader ({backend}), 0 workers, read-ahead off, top 15 by own time", "",
              (f"Full listing: profile_ours_{backend}_w0.txt. Under the profiler numba-compiled calls look "
              "several times slower than they run."), "", "```", "\n".join(body[:40]), "```"]
    return "\n".join(L) + "\n"

