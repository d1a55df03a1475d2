"""``results.json`` → ``results.md``: the tables, with the machine and the versions."""

from __future__ import annotations

from typing import Any

from common import table


def _settings(d: dict[str, Any]) -> str:
    """``{'method': 'rk4', 'step_size': 0.25}`` → ``method rk4, step size 0.25`` (for prose)."""
    return ", ".join(f"{k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                     for k, v in d.items())


def _header(r: dict[str, Any]) -> list[str]:
    m, v = r["machine"], r["versions"]
    out = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/run_all.py` (`make benchmarks`); do not edit by hand. What each number "
        "means and how it was measured: the docstring of the script named in each section, and the "
        "book's Performance appendix.",
        "",
        f"- date: {r['date']}" + (" — **quick run: sizes too small to mean anything**" if r.get("quick") else ""),
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}",
        f"- torch threads: {m['torch_threads']} (OMP_NUM_THREADS={m['omp_num_threads']}); load average at "
        f"the start {m['load_average']} (a busy machine stretches wall-clock times; CPU times move less)",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
    ]
    if "seconds" in r:
        out.append(f"- the whole run took {r['seconds'] / 60:.1f} min")
    return out + [""]


def _profile(p: dict[str, Any]) -> list[str]:
    s = p["split"]
    out = [
        "## Where the time of one training iteration goes (`bench_profile.py`)",
        "",
        f"Two moons, the recipe's field, batch {p['batch']}, after {p['warmup_iterations']} training "
        "iterations; medians over repeats, wall-clock ms.",
        "",
        table(["NFE", "forward solve", "of which the field", "solver bookkeeping", "backward pass"],
              [[s["nfe"], s["forward_ms"], s["field_in_forward_ms"],
                f"{s['solver_overhead_ms']:.1f} ({100 * s['solver_overhead_share']:.0f}%)", s["backward_ms"]]], 1),
        "",
        "One evaluation of the field and its exact divergence, forward and backward, against the batch "
        "size (at one point what is left is Python and autograd overhead):",
        "",
        table(["batch", "ms", "µs per point"], [[b["batch"], b["ms"], b["us_per_point"]] for b in p["per_batch"]], 2),
        "",
        "The divergence, per training iteration (forward solve and backward pass):",
        "",
    ]
    d = p["divergence"]
    base = d["exact_autograd"]["ms"]
    out.append(table(["divergence", "NFE", "ms", "CPU ms", "speed-up vs autograd"],
                     [[k.replace("_", " "), v["nfe"], v["ms"], v["cpu_ms"], base / v["ms"]] for k, v in d.items()], 2))
    if "backprop" in p:
        bp = p["backprop"]
        base = bp["through the solver"]["ms"]
        out += ["", "Backpropagation, per training iteration (NFE: forward + backward solves):", "",
                table(["gradient", "NFE", "ms", "CPU ms", "vs through the solver"],
                      [[k, v["nfe"], v["ms"], v["cpu_ms"], v["ms"] / base] for k, v in bp.items()], 2)]
    th = p["threads"]
    out += ["", "Torch threads, per training iteration:", "",
            table(["threads", "ms", "CPU ms", "vs one thread"],
                  [[k, v["ms"], v["cpu_ms"], v["ms"] / th["1"]["ms"]] for k, v in th.items()], 2), ""]
    return out


_RECIPE_SUMMARY = (("median gap (3 seeds)", "median_gap"), ("worst gap", "max_gap"),
                   ("median train s", "median_train_wall"), ("median CPU s", "median_train_cpu"),
                   ("reference gap", "reference_gap"), ("reference s", "reference_train_wall"),
                   ("speed-up (wall)", "speedup_wall"), ("speed-up (CPU)", "speedup_cpu"),
                   ("chapter 3 gap", "chapter_gap"), ("chapter 3 s", "chapter_train_wall"),
                   ("adaptive gap", "adaptive_gap"), ("adaptive s", "adaptive_train_wall"))


def _summary_by_data(summary: dict[str, dict[str, Any]]) -> str:
    """The recipe's summary with one row per quantity and one column per data set (narrow enough for a page)."""
    return table(["", *summary], [[label, *(v.get(key) for v in summary.values())] for label, key in _RECIPE_SUMMARY],
                 3)


def _recipe(rc: dict[str, Any]) -> list[str]:
    rec = rc["recipe"]
    out = [
        "## The 20-second target (`bench_recipe.py`)",
        "",
        f"Recipe: ConcatSquash {'-'.join(map(str, rec['hidden']))} {rec['activation']}, batch "
        f"{rec['batch_size']}, Adam {rec['lr']:g} cosine to {rec['lr_final']:g}, {rec['iterations']} "
        f"iterations, training solver: {_settings(rec['train_settings'])}; kinetic {rec['kinetic']:g}, "
        f"Frobenius {rec['frobenius']:g}, gradient norm clipped at {rec.get('grad_clip')}. Test NLL: 5,000 "
        "held-out points, exact trace, dopri5 at 1e-5. "
        "Reference: the issue's tuned simple recipe (batch 512, Adam 5e-3 → 5e-4, 500 iterations, "
        "dopri5 at 1e-3, exact trace by autograd as before this work), one seed; \"chapter 3\": chapter 3's longer "
        "adaptive recipe (Adam 2e-2 → 1e-4, kinetic 0.1, 600 iterations, dopri5 at 1e-3), one seed; "
        "\"adaptive\": the previous fast recipe (300 iterations, Adam 3e-2 → 1e-3, dopri5 at 1e-3, "
        "no clipping), one seed. \"RK4 check\": the same "
        "test NLL on a fine fixed grid (RK4, 200 steps), an independent solve that must agree.",
        "",
        table(["data", "run", "seed", "train s", "train CPU s", "NFE first → last", "test NLL", "true NLL", "gap",
               "gap, RK4 check"],
              [[r["toy"], r["run"], r["seed"], r["train_wall"], r["train_cpu"],
                f"{r['nfe_first']} → {r['nfe_last']:.0f}", r["test_nll"], r["true_nll"], r["gap"], r["check_gap"]]
               for r in rc["runs"]], 3),
        "",
        _summary_by_data(rc["summary"]),
        "",
    ]
    if "pitfall" in rc:
        p = rc["pitfall"]
        out += [
            f"A grid too coarse is no shortcut: the recipe on 8 Gaussians with {_settings(p['settings'])} for "
            f"{p['iterations']} iterations ({p['train_wall']:.1f} s, NFE {p['nfe_last']:.0f}) reads a gap of "
            f"{p['gap_on_own_grid']:.3f} nats on its own grid but {p['gap']:.3f} with dopri5 at 1e-5 "
            f"({p['check_gap']:.3f} with the fine RK4 check).",
            "",
        ]
    return out


def _peer(pr: dict[str, Any]) -> list[str]:
    out = [
        "## cnf_lib against zuko at equal settings (`bench_peer.py`)",
        "",
        f"zuko {pr['zuko_version']} `zuko.flows.CNF` and cnf_lib's `CNF`: hidden "
        f"{'-'.join(map(str, pr['hidden']))}, tanh, batch "
        f"{pr['batch']}, dopri5 at rtol = atol = {pr['tol']:g}, Adam {pr['lr']:g} cosine to {pr['lr_final']:g}, "
        "no regularization, trained side by side on the same batches. Per iteration: medians over "
        f"{pr['timing_iterations']} iterations from initialization.",
        "",
    ]
    rows, budget = [], []
    for s in pr["settings"]:
        data = s["label"].split(",")[0]  # the budget table names a setting by its data: narrow enough for a page
        for lib in ("cnf_lib", "zuko"):
            t = s["timing"][lib]
            rows.append([s["label"], lib, t["wall"] * 1e3, t["cpu"] * 1e3, t["nfe_forward"], t["nfe_backward"],
                         t["wall_per_nfe"] * 1e3])
            b = s["budget"][lib]
            budget.append([data, lib, f"{s['budget_s']:.0f}", b["iterations"], b["test_nll"], b["gap"]])
        if "own_recipe" in s:  # cnf_lib with Trainer's defaults, trained alone: its own time
            o = s["own_recipe"]
            budget.append([data, "cnf_lib defaults", f"{o['train_wall']:.0f}", o["iterations"],
                           o["test_nll"], o["gap"]])
        rows.append([s["label"], "**zuko / cnf_lib**", f"**{s['ratio_wall']:.2f}**", f"{s['ratio_cpu']:.2f}",
                     "", "", ""])
    truth = [(s["label"].split(",")[0], s["true_nll"]) for s in pr["settings"]]
    out += [table(["setting", "library", "ms per iteration", "CPU ms", "NFE forward", "NFE backward",
                   "ms per NFE"], rows, 2), "",
            "Held-out NLL after the same wall-clock budget (exact trace, tolerance 1e-5, each library's "
            "own evaluation); the last row of each setting is cnf_lib with `Trainer`'s defaults (a fixed RK4 "
            "grid, kinetic penalty, clipping), trained alone, with its own time in the budget column (settings as "
            "above, named by their data); gap = test "
            "NLL − true NLL (" + "; ".join(f"{name}: {nll:.3f}" for name, nll in truth) + "):", "",
            table(["setting", "library", "budget s", "iterations", "test NLL", "gap"], budget, 3), ""]
    return out


def _trace(tr: dict[str, Any]) -> list[str]:
    rows = [[r["dim"], r["train_exact_autograd_ms"], r["train_exact_forward_ms"], r["train_hutchinson_ms"],
             r.get("train_hutchinson_forward_ms"), r["train_ratio_exact_autograd"], r["train_ratio_exact_forward"],
             r["infer_ratio_exact_autograd"], r["infer_ratio_exact_forward"]] for r in tr["rows"]]
    return [
        "## Exact trace against Hutchinson, per evaluation (`bench_trace.py`)",
        "",
        f"One evaluation of the field (ConcatSquash {'-'.join(map(str, tr['hidden']))}, tanh) and its divergence for "
        f"{tr['batch']} points; training = forward and backward, inference = no graph. Exact by autograd "
        "= D vector-Jacobian products; exact forward-mode = the field's own Jacobian propagation; "
        "Hutchinson by one vector-Jacobian product (autograd) or one forward tangent (forward-mode, the "
        "CNF's route). The four ms columns are training evaluations; each ratio is exact / Hutchinson by "
        "routes of the same kind (AD: autograd; fwd: forward-mode), in training or inference.",
        "",
        table(["D", "exact AD ms", "exact fwd ms", "Hutch. AD ms", "Hutch. fwd ms", "train ratio AD",
               "train ratio fwd", "infer. ratio AD", "infer. ratio fwd"], rows, 2),
        "",
    ]


def _book(bk: dict[str, Any]) -> list[str]:
    where = f"; read on {bk['date']}, the pages built on {bk['machine']['cpu']}" if "machine" in bk else ""
    out = ["## The book's execution time (`bench_book.py`)", "", bk["note"] + where + ".", ""]
    if bk["pages"]:
        out += [table(["page", "seconds", "executed"],
                      [[p["page"], p["seconds"], p["executed"]] for p in bk["pages"]]
                      + [["**all pages**", bk["total_seconds"], ""]], 0), ""]
    return out


#: The tables of bench_heldout's other variants, in order: the caption's opening and its rest.
_HELDOUT_VARIANTS = {
    "flow_matching": ("The 6-D and 12-D sets trained by flow matching alone",
                      ": `Trainer(CNF(D, hidden=(64, 64, 64)), x, objective=FlowMatching())` at its defaults for D, "
                      "6,000 iterations of 1,024 points per budget unit (the budget column counts them), times "
                      "weighted towards the data, the SiLU field; no likelihood iterations:"),
    "tanh": ("The same sets with the trainer's defaults on a tanh field",
             ": `CNF(D, activation=\"tanh\")`, the field of every dimension before the SiLU default above 2-D:"),
    "warm_start": ("The 6-D and 12-D sets with the warm-start option",
                   " on a tanh field: 2,000 flow-matching iterations, then the defaults with 400 likelihood "
                   "iterations per budget unit on one cosine of 400 (the budget column counts the likelihood "
                   "iterations); CPU s include the warm start:"),
    "flow_matching_tanh": ("Flow matching alone at its earlier defaults",
                           ": 3,000 iterations of 2,048 points per budget unit, uniform times, a tanh field:"),
    "2d_recipe": ("The same sets with the 2-D defaults in every dimension",
                  ", before `TrainConfig.for_dim` (and on a tanh field):"),
}


def _heldout(h: dict[str, Any]) -> list[str]:
    def rows(records: list[dict[str, Any]]) -> list[list[Any]]:
        return [[r["set"], f"{r['budget']}× ({r['iterations']})", " ".join(f"{g:.3f}" for g in r["gaps"]), r["gap"],
                 r["grid_minus_adaptive"], r["cpu"], r["true_nll"]] for r in records]

    header = ["set", "budget (iterations)", "gap per seed", "median gap", "own grid − adaptive", "CPU s", "true NLL"]
    out = [
        "## The defaults on densities they were not tuned on (`bench_heldout.py`)",
        "",
        f"`Trainer(CNF(D, hidden=(64, 64, 64)), x).fit()` on standardized data ({h['n_train']:,} training, "
        f"{h['n_test']:,} test points), at 1×, 2× and 4× the default iterations; gap = test NLL − true NLL "
        "(nats, exact trace, dopri5 at 1e-5, the standardization's log-determinant included); own grid − "
        f"adaptive = the same NLL on the four-step RK4 training grid minus the adaptive one. Seeds: {h['seeds']}. "
        "Above two dimensions the defaults are `TrainConfig.for_dim`'s (Hutchinson's estimator in training, "
        "512 points per iteration) and the CNF's field is SiLU (`cnf_lib.fields.default_activation`).",
        "",
        table(header, rows(h["rows"]), 3),
        "",
    ]
    for variant, (opening, caption) in _HELDOUT_VARIANTS.items():
        if h.get(f"rows_{variant}"):
            date = h.get(f"date_{variant}", h.get("date", "this run"))
            out += [f"{opening} (variant `{variant}`, the run of {date}){caption}", "",
                    table(header, rows(h[f"rows_{variant}"]), 3), ""]
    return out


def _matching(m: dict[str, Any]) -> list[str]:
    rows = [[r["toy"], r["method"], " ".join(f"{g:.3f}" for g in r["gaps"]), r["mean_gap"], r["sd_gap"], r["cpu"]]
            for r in m["rows"]]
    def short(method: str) -> str:
        return method.replace("independent", "ind.")

    comps = [[c["toy"], f"{short(c['a'])} − {short(c['b'])}", c["mean"], c["se"], f"{c['a_ahead']}/{len(c['diffs'])}",
              f"{c['smallest_ratio']:.1f}–{c['largest_ratio']:.1f}"] for c in m["comparisons"]]
    return [
        "## Flow matching beside maximum likelihood, several seeds (`bench_matching.py`)",
        "",
        "Chapter 8's three trainings of one field on the 2-D toys (maximum likelihood with the `Trainer`'s "
        "defaults; flow matching with `cnf_lib.matching.TOY_SETTINGS`, independent or OT pairs), each with "
        f"seeds {m['seeds']}; gap = test NLL − true NLL on {m['n_test']:,} test points (exact trace, dopri5 at 1e-5).",
        "",
        table(["toy", "method", "gap per seed", "mean gap", "sd", "median CPU s"], rows, 3),
        "",
        "Differences of test NLL (negative: the first method has the lower NLL; per seed, the difference of "
        "the gaps above): their mean and standard error (se) over seeds, on how many seeds the first was ahead, "
        "and each seed's absolute difference over its paired standard error (per-point log-densities), "
        "smallest–largest.",
        "",
        table(["toy", "comparison", "mean", "se", "first ahead", "in paired se"], comps, 4),
        "",
    ]


def _cells(c: dict[str, Any]) -> list[str]:
    rows = [[r["dim"], f"{r['cells']:,}", r["method"], r["test_nll"], r["test_nll"] - r["true_nll"],
             "–" if r["cpu"] != r["cpu"] else r["cpu"], r["warnings"]] for r in c["rows"]]
    truth = {r["dim"]: r["true_nll"] for r in c["rows"]}
    return [
        "## A density of 2,000 and 20,000 cells in 10 and 30 columns (`bench_cells.py`)",
        "",
        "A known density (three elongated Gaussians warped coordinate-wise), 5,000 test cells; "
        "`fit_density(adata, n_comps=D)` with its defaults (a CNF on a Gaussian-mixture base), that base "
        "alone, and a full-covariance Gaussian mixture whose number of components BIC chose among 1, 2, 4, ..., 64. "
        "Defaults tuned on other sets (D = 12 and 24, other seeds: `tune_cells.py`). Gap = test NLL − true NLL ("
        + ", ".join(f"{v:.3f} in D = {d}" for d, v in truth.items()) + ").",
        "",
        table(["D", "cells", "method", "test NLL", "gap", "fit CPU s", "warnings"], rows, 3),
        "",
    ]


def _timecourse(tc: dict[str, Any]) -> list[str]:
    def w1(d: dict[str, Any]) -> str:
        return f"{d['w1']:.3f}" if d["exact"] else f"{d['w1']:.3f} [{d['lower']:.3f}, {d['upper']:.3f}]"

    iterations = sorted({r["iterations"] for r in tc["rows"]})
    same = len(iterations) == 1  # then said once, in the caption: the table stays narrow enough for a page
    rows = [[f"{r['cells']:,}", *([] if same else [r["iterations"]]), r["fit_cpu"], r["push_cpu"], r["ot_cpu"],
             r["w1_cpu"], w1(r["cnf"]), w1(r["ot"])] for r in tc["rows"]]
    return [
        "## A time course of up to 20,000 cells a day (`bench_timecourse.py`)",
        "",
        f"Chapter 7's simulated course, day {tc['held_out']:g} held out (PCA without it); `fit_trajectories` "
        "with its defaults (5 principal components" + (f", {iterations[0]} iterations" if same else "") + "); the "
        "day before pushed to the held-out time; W1 to the "
        f"held-out cells exact up to {tc['exact_max_pairs']:.0e} cell pairs, above that between "
        f"{tc['n_centres']:,} weighted k-means centres a side with certified [lower, upper] bounds (OT "
        "interpolation there between the neighbours' centres).",
        "",
        table(["cells a day", *([] if same else ["iterations"]), "fit CPU s", "push CPU s", "OT interp. CPU s",
               "W1 CPU s", "W1 CNF", "W1 OT interp."], rows, 3),
        "",
    ]


def markdown(r: dict[str, Any]) -> str:
    out = _header(r)
    for key, fn in (("profile", _profile), ("recipe", _recipe), ("peer", _peer), ("trace", _trace),
                    ("heldout", _heldout), ("matching", _matching), ("cells", _cells), ("timecourse", _timecourse),
                    ("book", _book)):
        if key in r:
            section = fn(r[key])
            if r[key].get("date"):  # a partial run (--only) refreshes some sections, not all
                section[1:1] = ["", f"Measured {r[key]['date']}."]
            out += section
    return "\n".join(out) + "\n"


def html(lines: list[str]) -> str:
    """The same lines as HTML (markdown tables, paragraphs, ``**bold**`` and ``code``), for the
    book, whose notebook outputs do not parse markdown tables."""
    import html as _html
    import re

    def inline(text: str) -> str:
        text = _html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    out: list[str] = []
    rows: list[list[str]] = []

    # padded cells (the book's theme gives a bare <table> none, so numbers ran together) in a box that
    # scrolls sideways when a table is wider than the page
    cell = 'style="padding:.2em .6em"'

    def flush() -> None:
        if rows:
            head, body = rows[0], rows[2:]
            out.append('<div style="overflow-x:auto"><table class="table">'
                       + "<thead><tr>" + "".join(f"<th {cell}>{inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td {cell}>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table></div>")
            rows.clear()

    for line in "\n".join(lines).split("\n"):
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)
