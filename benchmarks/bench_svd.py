#!/usr/bin/env python
"""Benchmarks for weight deltas and their SVD, measured side by side in one run.

1. Randomized vs exact SVD (`weightwatch_nb.delta.top_svd`) on deltas with known structure: speed ratio and
   subspace agreement (cosines of the principal angles between the top-k subspaces).
2. Peak memory of computing directions for every matrix of a generated checkpoint pair: streaming the two
   folders one tensor at a time vs loading both models first. Each mode runs in a fresh subprocess and reports
   its peak RSS (VmHWM) above its RSS after imports.

Usage: python benchmarks/bench_svd.py [--quick] [--out benchmarks/RESULTS.md]
"""
from __future__ import annotations
import argparse, datetime, json, os, platform, shutil, subprocess, sys, tempfile, time
from pathlib import Path

def _status_mb(field:str)->float:
    with open('/proc/self/status') as f: return next(int(l.split()[1]) for l in f if l.startswith(field + ':')) / 1024

def rss_mb()->float:
    "Current resident set size in MiB (Linux)."
    return _status_mb('VmRSS')

def peak_mb()->float:
    "Peak resident set size of this process image in MiB (VmHWM; `getrusage`'s ru_maxrss survives fork + exec, so a child would report its parent's peak)."
    return _status_mb('VmHWM')

def run_child(script:str, *args:str)->dict:
    "Run `script --child ARGS` in a fresh process and return the JSON line it prints last."
    r = subprocess.run([sys.executable, script, '--child', *args], capture_output=True, text=True, env={**os.environ, 'TOKENIZERS_PARALLELISM': 'false'})
    if r.returncode: sys.exit(f"child {args[0]} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])

def memory_table(first:str, rows:list, model_mb:float)->list[str]:
    "Markdown rows of peak RSS per mode: `first` heads the mode column; `rows` are (name, child result); ratios are to one model's size."
    inc = lambda r: r['peak_mb'] - r['baseline_mb']
    return ([f"| {first} | peak RSS (MiB) | baseline after imports (MiB) | above baseline (MiB) | above baseline / one model | time (s) |",
             "|---|---|---|---|---|---|"] +
            [f"| {n} | {r['peak_mb']:.0f} | {r['baseline_mb']:.0f} | {inc(r):.0f} | {inc(r)/model_mb:.2f}x | {r['seconds']:.1f} |" for n, r in rows])

# ---------------------------------------------------------------- memory: one child process per mode
def child(mode:str, base:str, ft:str):
    import torch
    from weightwatch_nb.core import load_hf
    from weightwatch_nb.delta import MATRICES
    from weightwatch_nb.directions import compute_directions
    from weightwatch_nb.delta import top_svd
    from transformers import LlamaForCausalLM  # noqa: F401
    # warm-up: imports and the LAPACK/BLAS code pages count in the baseline, not in the measurement
    for meth in ('exact', 'randomized'): top_svd(torch.randn(256, 1024), 4, meth)
    t0, base_rss = time.perf_counter(), rss_mb()
    if mode == 'loaded':
        b, f = load_hf(base)[0], load_hf(ft)[0]
    else: b, f = base, ft
    d = compute_directions(b, f, k=20, matrices=MATRICES, progress=False)
    print(json.dumps({'mode': mode, 'baseline_mb': base_rss, 'peak_mb': peak_mb(), 'seconds': time.perf_counter() - t0,
                      'n_matrices': len(d.vectors), 'n_directions': len(d)}))

def memory_bench(quick:bool)->dict:
    from weightwatch_nb.core import make_tiny_checkpoint
    from weightwatch_nb.delta import plant_update
    sizes = dict(d_model=256, n_layers=2, d_mlp=704, vocab_size=2000) if quick else dict(d_model=1024, n_layers=6, d_mlp=2816, vocab_size=8000)
    tmp = Path(tempfile.mkdtemp(prefix='ww_bench_'))
    try:
        b = make_tiny_checkpoint(tmp/'base', 'llama', **sizes)
        plant_update(b, tmp/'ft', {(1, 'mlp_out'): 8}, noise=1e-3)      # dense change everywhere, like a full fine-tune
        size_mb = sum(f.stat().st_size for f in b.glob('*.safetensors')) / 2**20
        res = {}
        for mode in ('stream', 'loaded'): res[mode] = run_child(__file__, mode, str(b), str(tmp/'ft'))
        return {'sizes': sizes, 'model_mb': size_mb, **res}
    finally: shutil.rmtree(tmp, ignore_errors=True)

# ---------------------------------------------------------------- SVD
def planted(m, n, r, noise_edge, g):
    "Rank-r signal (singular values 1 .. 0.5) plus Gaussian noise whose top singular value is about `noise_edge`."
    import torch
    U0 = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
    V0 = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
    D = U0 @ torch.diag(torch.linspace(1, .5, r)) @ V0.T
    return D.add_(torch.randn(m, n, generator=g), alpha=noise_edge / (m**.5 + n**.5)), U0

def power_law(m, n, g):
    "Full-rank delta with singular values 1/i, like the slowly decaying spectrum of a full fine-tune."
    import torch
    p = min(m, n)
    U = torch.linalg.qr(torch.randn(m, p, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, p, generator=g))[0]
    return (U * (1 / torch.arange(1, p + 1))) @ V.T, None

def svd_bench(quick:bool, k:int=20)->list[dict]:
    import torch
    from weightwatch_nb.delta import top_svd, subspace_cosines
    g = torch.Generator().manual_seed(0)
    s = 4 if quick else 1
    cases = [(f'{4096//s}x{4096//s}', 'rank 20 + noise', lambda: planted(4096//s, 4096//s, k, 0.2, g)),
             (f'{4096//s}x{11008//s}', 'rank 20 + noise', lambda: planted(4096//s, 11008//s, k, 0.2, g)),
             (f'{4096//s}x{4096//s}', 'power law 1/i', lambda: power_law(4096//s, 4096//s, g))]
    rows = []
    for shape, kind, make in cases:
        D, U0 = make()
        t = time.perf_counter(); Ue, Se, _ = top_svd(D, k, 'exact'); te = time.perf_counter() - t
        times = []
        for _ in range(3):
            t = time.perf_counter(); Ur, Sr, _ = top_svd(D, k, 'randomized'); times.append(time.perf_counter() - t)
        tr = sorted(times)[1]
        row = dict(shape=shape, delta=kind, k=k, exact_s=te, randomized_s=tr, speedup=te / tr,
                   cos_min=float(subspace_cosines(Ur, Ue).min()), s_relerr=float(((Sr - Se).abs() / Se).max()),
                   vec_cos_min=float((Ur * Ue).sum(0).min()))
        if U0 is not None:
            row['planted_cos_exact'] = float(subspace_cosines(Ue, U0).min())
            row['planted_cos_randomized'] = float(subspace_cosines(Ur, U0).min())
        rows.append(row); print(json.dumps(row), flush=True)
        del D
    return rows

# ---------------------------------------------------------------- report
def report(svd:list[dict], mem:dict, quick:bool, wall:float)->str:
    import torch
    load = os.getloadavg()
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    L = [f"# Benchmark results: weight deltas and SVD directions", "",
         f"Measured by `python benchmarks/bench_svd.py{' --quick' if quick else ''}` on {datetime.date.today()}: {cpu}, "
         f"torch {torch.__version__} with {torch.get_num_threads()} threads, CPU only, on a machine shared with other jobs "
         f"(load average {load[0]:.1f} on {os.cpu_count()} cores at the end, so absolute times are noisy; each ratio comes from one run, "
         f"both sides measured back to back). Total run time {wall/60:.1f} min.", "",
         "## Randomized vs exact SVD", "",
         f"`top_svd(D, k={svd[0]['k']})` with `method='exact'` (`torch.linalg.svd`) and `method='randomized'` (`torch.svd_lowrank`, "
         "oversampling max(k, 10), 4 power iterations, seeded); randomized time is the median of 3 runs. "
         "*subspace cos* is the smallest cosine of the principal angles between the two top-k subspaces (1 = identical; goal >= 0.999), "
         "*vector cos* the smallest cosine between matching singular vectors (signs included), *σ rel. err.* the largest relative "
         "difference of the top-k singular values.", "",
         "| ΔW shape | structure | exact (s) | randomized (s) | speed-up | subspace cos | vector cos | σ rel. err. | planted recovered (exact / randomized) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in svd:
        pl = f"{r['planted_cos_exact']:.6f} / {r['planted_cos_randomized']:.6f}" if 'planted_cos_exact' in r else 'n/a'
        L.append(f"| {r['shape']} | {r['delta']} | {r['exact_s']:.1f} | {r['randomized_s']:.2f} | {r['speedup']:.0f}x | {r['cos_min']:.6f} | "
                 f"{r['vec_cos_min']:.6f} | {r['s_relerr']:.1e} | {pl} |")
    st, lo, mb = mem['stream'], mem['loaded'], mem['model_mb']
    inc = lambda r: r['peak_mb'] - r['baseline_mb']
    z = mem['sizes']
    L += ["", "*planted recovered*: smallest principal-angle cosine between the top-20 subspace and the planted one; "
          "below 1 only because the noise tilts the signal subspace, the same for both methods.", "",
          "## Peak memory: streaming vs loading both models", "",
          f"A generated Llama-style pair (d_model={z['d_model']}, {z['n_layers']} layers, d_mlp={z['d_mlp']}, vocab={z['vocab_size']}, "
          f"float32, {mb:.0f} MiB of safetensors per model; the fine-tune changes every matrix) and "
          "`compute_directions(base, finetuned, k=20, matrices=MATRICES)` (all nine matrix kinds, fingerprints included). "
          "Each mode runs in a fresh process; *above baseline* is the peak RSS minus the RSS after imports (Python, torch, transformers).", "",
          *memory_table('mode', [('streaming two folders', st), ('loading both models first', lo)], mb)]
    L += ["", f"Streaming needs {inc(st)/inc(lo):.2f}x the extra memory of loading both models "
          f"({inc(st)/mb:.2f}x one model's size; goal <= 1.3x).", ""]
    return '\n'.join(L)

if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--child': child(*sys.argv[2:5]); sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='small sizes, to check that the script runs')
    ap.add_argument('--out', default=str(Path(__file__).parent/'RESULTS.md'), help='markdown file to write (default benchmarks/RESULTS.md)')
    a = ap.parse_args()
    t0 = time.perf_counter()
    mem = memory_bench(a.quick); print(json.dumps(mem), flush=True)
    svd = svd_bench(a.quick)
    text = report(svd, mem, a.quick, time.perf_counter() - t0)
    print(text)
    Path(a.out).write_text(text)
