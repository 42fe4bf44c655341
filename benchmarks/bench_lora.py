#!/usr/bin/env python
"""Peak memory of a weight edit of a LoRA fine-tune: the adapter merged tensor by tensor (`delta.LoraTensors`) vs a
merged copy of the whole model (what `edit.removed_update` did before), measured side by side in one run.

Each mode runs `removed_update(base, finetuned, k)` (the factors `steer.ClipWeights` subtracts) for every attention and
MLP output matrix of a generated Llama-style checkpoint with a LoRA adapter on all of its linear layers, in a fresh
subprocess, and reports its peak RSS (VmHWM) above its RSS after imports. Both modes must give the same update.

Usage: python benchmarks/bench_lora.py [--quick] [--out benchmarks/RESULTS_lora.md]
"""
from __future__ import annotations
import argparse, datetime, json, platform, shutil, sys, tempfile, time
from pathlib import Path
from bench_svd import rss_mb, peak_mb, run_child, memory_table

K = 4   # directions removed per matrix

def child(mode:str, base:str, adapter:str):
    import torch
    from weightwatch_nb.edit import removed_update, _merged
    from weightwatch_nb.delta import top_svd
    for meth in ('exact', 'randomized'): top_svd(torch.randn(256, 1024), 4, meth)   # warm-up: BLAS/LAPACK pages count in the baseline
    t0, base_rss = time.perf_counter(), rss_mb()
    ft = adapter if mode == 'lazy' else _merged(base, adapter)   # 'merged': the whole model, base + adapter, first
    upd = removed_update(base, ft, K, progress=False)
    check = sum(float((A.double() @ B.double()).norm()) for A, B in upd.values())
    print(json.dumps({'mode': mode, 'baseline_mb': base_rss, 'peak_mb': peak_mb(), 'seconds': time.perf_counter() - t0,
                      'tensors': len(upd), 'update_norm_sum': check}))

def run(quick:bool)->dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from weightwatch_nb.core import make_tiny_checkpoint, load_hf
    sizes = dict(d_model=256, n_layers=2, d_mlp=704, vocab_size=2000) if quick else dict(d_model=1024, n_layers=6, d_mlp=2816, vocab_size=8000)
    tmp = Path(tempfile.mkdtemp(prefix='ww_bench_lora_'))
    try:
        b = make_tiny_checkpoint(tmp/'base', 'llama', **sizes)
        torch.manual_seed(0)
        pm = get_peft_model(load_hf(b)[0], LoraConfig(r=16, lora_alpha=32, target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj',
                                                                                            'gate_proj', 'up_proj', 'down_proj']))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if 'lora_B' in n: p.normal_(0, 0.02)
        pm.save_pretrained(tmp/'lora'); del pm
        res = {'sizes': sizes, 'model_mb': sum(f.stat().st_size for f in b.glob('*.safetensors')) / 2**20,
               'adapter_mb': (tmp/'lora'/'adapter_model.safetensors').stat().st_size / 2**20}
        for mode in ('lazy', 'merged'):
            res[mode] = run_child(__file__, mode, str(b), str(tmp/'lora')); print(json.dumps(res[mode]), flush=True)
        return res
    finally: shutil.rmtree(tmp, ignore_errors=True)

def report(res:dict, quick:bool, wall:float)->str:
    import torch
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    lz, mg, mb, z = res['lazy'], res['merged'], res['model_mb'], res['sizes']
    inc = lambda r: r['peak_mb'] - r['baseline_mb']
    same = abs(lz['update_norm_sum'] - mg['update_norm_sum']) <= 1e-6 * mg['update_norm_sum'] and lz['tensors'] == mg['tensors']
    L = ["# Benchmark results: editing a LoRA fine-tune", "",
         f"Measured by `python benchmarks/bench_lora.py{' --quick' if quick else ''}` on {datetime.date.today()}: {cpu}, "
         f"torch {torch.__version__}, CPU only. Total run time {wall/60:.1f} min.", "",
         f"A generated Llama-style base (d_model={z['d_model']}, {z['n_layers']} layers, d_mlp={z['d_mlp']}, vocab={z['vocab_size']}, "
         f"float32, {mb:.0f} MiB of safetensors) with a rank-16 LoRA adapter on every linear layer ({res['adapter_mb']:.1f} MiB), and "
         f"`removed_update(base, finetuned, {K})` over the attention and MLP output matrices. Each mode runs in a fresh process; "
         "*above baseline* is the peak RSS minus the RSS after imports.", "",
         *memory_table('fine-tuned weights read as', [('the adapter, merged tensor by tensor (`LoraTensors`)', lz),
                                                      ('a merged copy of the whole model', mg)], mb)]
    L += ["", f"Merging tensor by tensor needs {inc(lz)/inc(mg):.2f}x the extra memory of a merged copy ({inc(lz)/mb:.2f}x one model's "
          f"size, against {inc(mg)/mb:.2f}x). Both give the same update: {lz['tensors']} tensors, "
          f"{'equal' if same else 'DIFFERENT'} sums of ‖A·B‖ ({lz['update_norm_sum']:.6g} and {mg['update_norm_sum']:.6g}).", ""]
    return '\n'.join(L)

if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--child': child(*sys.argv[2:5]); sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='small sizes, to check that the script runs')
    ap.add_argument('--out', default=str(Path(__file__).parent/'RESULTS_lora.md'), help='markdown file to write (default benchmarks/RESULTS_lora.md)')
    a = ap.parse_args()
    t0 = time.perf_counter()
    res = run(a.quick)
    text = report(res, a.quick, time.perf_counter() - t0)
    print(text)
    if not a.quick: Path(a.out).write_text(text)
