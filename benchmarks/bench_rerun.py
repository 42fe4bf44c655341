#!/usr/bin/env python
"""How `ClipWeights` reruns a mixture of experts: in place on the routed experts vs an edited copy, measured side by side.

`ClipWeights` cannot subtract a fused experts tensor's update at a linear layer's output, so at every pass with a
switched token it reruns the experts module (and the router) on those tokens without the update. Three ways, one run:

- in place (the default when no gradients are recorded): where the switched tokens are routed to fewer than a quarter
  of a tensor's experts, the edited values of just those experts are written into the model's tensors for the rerun
  and put back at once; otherwise a copy, as below;
- copy (`ClipWeights(..., in_place=False)`, and what grad mode does): a copy of the whole tensor minus the update
  (computed in float32 a few experts at a time, rounded back), handed to `torch.func.functional_call`;
- cached (`ClipWeights(..., cache=True)`): that copy made once and kept while the steerer is attached.

All are timed against plain generation (no hooks) on two random Mixtrals, one with many narrow experts (64, top-8, as
OLMoE) and one with few wide ones (8, top-2, as Mixtral), with every token of every sequence switched from the start
(`_AllOn`: the rerun's worst case), at batch sizes 1 and 8; repetitions alternate between the modes and the best CPU
time of each is reported (one torch thread). Peak memory: in a fresh process per mode that loads the model and warms
it up, the resident set's high-water mark over one generation above what it was before (`/proc/self/clear_refs`
resets the mark). All must generate the same tokens (checked).

Usage: python benchmarks/bench_rerun.py [--quick] [--dtype bfloat16] [--append benchmarks/RESULTS_rerun.md]
"""
from __future__ import annotations
import argparse, datetime, json, os, platform, subprocess, sys, tempfile, time
from pathlib import Path
import torch

COMMON = dict(vocab_size=300, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
MODELS = {'fine': dict(COMMON, intermediate_size=256, num_local_experts=64, num_experts_per_tok=8),    # OLMoE's shape: many narrow experts
          'coarse': dict(COMMON, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2)}  # Mixtral's: few wide ones
QUICK = {k: dict(v, hidden_size=128, intermediate_size=v['intermediate_size'] // 4) for k, v in MODELS.items()}

DTYPE = torch.float32   # set by --dtype (also in the child processes)

def build(path:Path, sizes:dict)->Path:
    "A random Mixtral checkpoint with a tokenizer."
    import transformers as tf
    from weightwatch_nb.core import tiny_tokenizer
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model('mixtral', **sizes)).save_pretrained(path)
    tiny_tokenizer(sizes['vocab_size']).save_pretrained(path)
    return path

MODES = {'plain': None, 'in place': dict(in_place=True), 'copy': dict(in_place=False), 'cached': dict(cache=True)}   # ClipWeights' settings

def setup(ck:Path, kw:dict|None):
    "(bridge, steerer or None): every block tensor of the experts and routers gets a random rank-16 update (per expert for the fused ones)."
    from weightwatch_nb.core import load_model, hf_state_dict, fingerprint
    from weightwatch_nb.directions import Directions
    from weightwatch_nb.calibrate import calibrate
    from weightwatch_nb.steer import _AllOn
    m = load_model(ck, dtype=DTYPE)
    if kw is None: return m, None
    g, r = torch.Generator().manual_seed(1), 16
    upd = {k: (torch.randn(*W.shape[:-1], r, generator=g) * 1e-3, torch.randn(*W.shape[:-2], r, W.shape[-1], generator=g) * 1e-3)
           for k, W in hf_state_dict(m).items() if '.mlp.' in k}
    d = m.cfg.d_model
    dirs = Directions.from_vectors({(l, 'mlp_out'): torch.randn(4, d, generator=g) for l in range(m.cfg.n_layers)},
                                   meta={'fingerprints': {'base': None, 'finetuned': fingerprint(m)}})
    mon = calibrate(m, dirs, [f'the model {i} of the test {j}' for i in range(8) for j in range(4)], holdout=0., progress=False)
    return m, _AllOn(mon, upd, **kw)

def generate(m, st, batch:int, n_new:int):
    "Greedy generation of `n_new` tokens for `batch` equal prompts of 12 tokens, steered by `st` (None: plain)."
    from weightwatch_nb.steer import steering
    ids = torch.arange(1, 13).repeat(batch, 1) + torch.arange(batch)[:, None]
    gen = lambda: m.original_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                            min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if st is None: return gen()
        with steering(m, st): return gen()

def vm(field:str)->float:
    "A /proc/self/status field in MiB."
    return int(next(l for l in open('/proc/self/status') if l.startswith(field + ':')).split()[1]) / 1024

def child(ck:str, mode:str, batch:int, n_new:int):
    "One fresh process: load, warm up, then the peak resident set above the loaded model (MiB) over one generation, as JSON."
    import ctypes, gc
    torch.set_num_threads(1)
    m, st = setup(Path(ck), MODES[mode])
    generate(m, st, batch, 2)
    gc.collect(); ctypes.CDLL('libc.so.6').malloc_trim(0)
    open('/proc/self/clear_refs', 'w').write('5')   # reset the high-water mark (VmHWM) to the current resident set
    before = vm('VmRSS'); generate(m, st, batch, n_new)
    print(json.dumps({'rss_mib': before, 'extra_mib': vm('VmHWM') - before}))

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true', help='smaller models, one repetition (a smoke test)')
    ap.add_argument('--append', default=None, help='markdown file to append this run to')
    ap.add_argument('--reps', type=int, default=5)
    ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'], help='the precision the models run in')
    ap.add_argument('--child', nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    global DTYPE
    DTYPE = getattr(torch, a.dtype)
    if a.child: return child(a.child[0], a.child[1], int(a.child[2]), int(a.child[3]))
    torch.set_num_threads(1)
    shapes, reps, n_new = (QUICK, 1, 4) if a.quick else (MODELS, a.reps, 16)
    tmp, rows = Path(tempfile.mkdtemp()), []
    for name, sizes in shapes.items():
        ck = build(tmp/name, sizes)
        models = {mode: setup(ck, kw) for mode, kw in MODES.items()}
        E, d, ff, L, k = (sizes[x] for x in ('num_local_experts', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_experts_per_tok'))
        label = f"{E} experts of d_mlp {ff}, top-{k} ({E * 3 * d * ff * DTYPE.itemsize / 2**20:.0f} MiB of experts per layer)"
        for batch in (1, 8):
            outs = {mode: generate(*models[mode], batch, n_new) for mode in models}   # (also a warm-up)
            assert torch.equal(outs['in place'], outs['copy']) and torch.equal(outs['cached'], outs['copy']), 'the modes generated different tokens'
            best = {mode: float('inf') for mode in models}
            for _ in range(reps):
                for mode in models:
                    c = time.process_time(); generate(*models[mode], batch, n_new); best[mode] = min(best[mode], time.process_time() - c)
            mem = {}
            for mode in models:
                p = subprocess.run([sys.executable, __file__, '--dtype', a.dtype, '--child', str(ck), mode, str(batch), str(n_new)], capture_output=True, text=True, check=True)
                mem[mode] = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append((label, batch, best, mem))
            print(f"{label}, batch {batch}: " + ', '.join(f"{m} {v:.3f} s" for m, v in best.items()) +
                  f" | in place / plain {best['in place']/best['plain']:.2f}, copy / plain {best['copy']/best['plain']:.2f}, "
                  f"copy / in place {best['copy']/best['in place']:.2f}, cached / plain {best['cached']/best['plain']:.2f} | extra peak MiB " +
                  ', '.join(f"{m} {v['extra_mib']:.0f}" for m, v in mem.items()), flush=True)
    if a.append:
        c = COMMON if not a.quick else QUICK['fine']
        lines = [f"\n## Run of {datetime.datetime.now():%Y-%m-%d %H:%M}\n",
                 f"{platform.machine()}, {os.cpu_count()} visible CPU cores (shared), torch {torch.__version__} on 1 thread, {a.dtype}, CPU. "
                 f"Random Mixtrals, {c['num_hidden_layers']} layers, d_model {c['hidden_size']}; a rank-16 update on every expert and router; "
                 f"{n_new} new tokens from 12-token prompts, every token switched; best CPU seconds of {reps} alternating repetitions; "
                 f"extra peak: the resident set's high-water mark during one generation above the loaded, warmed-up model, in a fresh "
                 f"process per mode.\n",
                 "| experts | batch | plain s | in place s | copy s | cached s | in place / plain | copy / plain | copy / in place | cached / plain | extra peak MiB: plain | in place | copy | cached |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, batch, b, mem in rows:
            lines.append(f"| {label} | {batch} | {b['plain']:.3f} | {b['in place']:.3f} | {b['copy']:.3f} | {b['cached']:.3f} | {b['in place']/b['plain']:.2f} | "
                         f"{b['copy']/b['plain']:.2f} | **{b['copy']/b['in place']:.2f}** | **{b['cached']/b['plain']:.2f}** | {mem['plain']['extra_mib']:.0f} | "
                         f"{mem['in place']['extra_mib']:.0f} | {mem['copy']['extra_mib']:.0f} | {mem['cached']['extra_mib']:.0f} |")
        p = Path(a.append)
        if not p.exists(): p.write_text("# `ClipWeights` on a mixture of experts: rerun in place vs on a copy (`benchmarks/bench_rerun.py`)\n")
        with p.open('a') as f: f.write('\n'.join(lines) + '\n')
        print(f"appended to {p}")

if __name__ == '__main__': main()
