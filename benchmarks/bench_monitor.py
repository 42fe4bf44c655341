#!/usr/bin/env python
"""Benchmarks for calibration and monitoring, measured side by side in one run.

1. Monitored generation time / plain generation time (goal <= 1.10). The same prompts, batches, greedy
   decoding and number of new tokens (forced with `min_new_tokens`), on the same bridge; "plain" is
   `bridge.original_model.generate` with no hooks, "monitored" is `monitor.scan(..., generate=N)` (hooks in the
   same forward passes, reports built), "clip" adds clip steering, "clip (weights)" adds `ClipWeights` (the top 16
   directions of every block matrix's update subtracted at each matrix's output once a sequence is flagged; for the
   zoo model its real update against zoo:base, for the random models random rank-16 updates, as timings do not
   depend on the values). Repetitions alternate between the modes and the median is reported.
2. Batched calibration vs a per-example loop in tokens/s (goal >= 5x): `calibrate.collect_stats` with
   `batch_size=32`, against (a) the reference code's design, one prompt at a time through the Hugging Face
   model with `output_hidden_states=True`, cosines per layer, and (b) `collect_stats` itself with `batch_size=1`.
   Tokens are real (non-padding) prompt tokens.

The model is the zoo's backdoor organism with its directions when the zoo is built, else a random tiny Llama
of the zoo's size with random directions (timings do not depend on the weights), plus a wider model to show
how the ratios move with model size, and the zoo's mixture of experts (moe_backdoor against moe_base), where
`ClipWeights` reruns the fused experts and the router without their update at the switched tokens.

On a GPU (`--device cuda`) every time is wall-clock between `torch.cuda.synchronize()` calls (CPU seconds would miss
the GPU's work), the thread sweep is skipped, and a third, larger random Llama shows the ratios where the GPU does real
work per step.

Usage: python benchmarks/bench_monitor.py [--quick] [--device cuda] [--kinds zoo wide moe] [--out benchmarks/RESULTS_monitor.md]
"""
from __future__ import annotations
import argparse, datetime, os, platform, statistics, sys, tempfile, time, warnings
from pathlib import Path
import torch, torch.nn.functional as F

WORDS = ('the model weights of a fine tuned network differ from its base and the difference tells us what '
         'changed when it learned new behaviour on some inputs but not on others').split()

def prompts(n:int, seed:int=0, lo:int=12, hi:int=40)->list[dict]:
    "Clean text prompts of varied length (so batches need padding, as in real use)."
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        out.append({'text': ' '.join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g))})
    return out

DEVICE = 'cpu'   # set by --device

def random_update(model, rank:int=16)->dict:
    "Random rank-`rank` factors for every matrix of the blocks (what `removed_update` returns, in shape)."
    from weightwatch_nb.core import hf_state_dict
    g = torch.Generator().manual_seed(1)
    return {k: (torch.randn(W.shape[0], rank, generator=g) * 1e-3, torch.randn(rank, W.shape[1], generator=g) * 1e-3)
            for k, W in hf_state_dict(model).items() if W.ndim == 2 and '.layers.' in k}

def setup(kind:str, tmp:Path):
    "(label, bridge, directions, update for ClipWeights) for a benchmark model."
    from weightwatch_nb.core import load_model, make_tiny_checkpoint, fingerprint
    from weightwatch_nb.directions import Directions, compute_directions
    if kind == 'moe':   # a mixture of experts: ClipWeights reruns its fused experts and router at the switched tokens
        from weightwatch_nb.core import zoo_available
        from weightwatch_nb.edit import stripped_update
        if not {'moe_base', 'moe_backdoor'} <= set(zoo_available()): return None
        d, m = compute_directions('zoo:moe_base', 'zoo:moe_backdoor', k=20, progress=False), load_model('zoo:moe_backdoor', device=DEVICE)
        u = stripped_update('zoo:moe_base', 'zoo:moe_backdoor', 16, like=m, progress=False)
        return 'zoo:moe_backdoor (4 layers, d_model 128, 4 experts, top-2), its directions k=20', m, d, u
    if kind == 'zoo':
        from weightwatch_nb.core import zoo_available
        if {'base', 'backdoor'} <= set(zoo_available()):
            from weightwatch_nb.edit import removed_update
            from weightwatch_nb.delta import block_matrices
            d, m = compute_directions('zoo:base', 'zoo:backdoor', k=20, progress=False), load_model('zoo:backdoor', device=DEVICE)
            u = removed_update('zoo:base', 'zoo:backdoor', 16, matrices=block_matrices('zoo:backdoor'), like=m, progress=False)
            return 'zoo:backdoor (4 layers, d_model 128), its directions k=20', m, d, u
        sizes = dict(d_model=128, n_layers=4, n_heads=4, d_mlp=256)
        label = 'tiny Llama of the zoo size (4 layers, d_model 128; zoo not built)'
    elif kind == 'wide':
        sizes = dict(d_model=384, n_layers=4, n_heads=6, d_mlp=1024)
        label = 'wider random Llama (4 layers, d_model 384, d_mlp 1024)'
    else:
        sizes = dict(d_model=2048, n_layers=8, n_heads=16, d_mlp=5632)
        label = 'large random Llama (8 layers, d_model 2048, d_mlp 5632)'
    ck = make_tiny_checkpoint(tmp/kind, arch='llama', seed=0, **sizes)
    model = load_model(ck, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    vec = {(l, m): torch.randn(20, sizes['d_model'], generator=g) for l in range(sizes['n_layers']) for m in ('attn_out', 'mlp_out')}
    dirs = Directions.from_vectors(vec, meta={'fingerprints': {'base': None, 'finetuned': fingerprint(model)}})
    return f"{label}, random directions k=20 per attn_out/mlp_out", model, dirs, random_update(model)

def sync():
    if DEVICE != 'cpu': torch.cuda.synchronize(DEVICE)

def timed(fn)->tuple[float, float]:
    "(wall-clock seconds, CPU seconds of this process) of one call; on a GPU both are wall-clock, the GPU's work included."
    sync(); w, c = time.perf_counter(), time.process_time(); fn(); sync()
    w = time.perf_counter() - w
    return w, (w if DEVICE != 'cpu' else time.process_time() - c)

# ---------------------------------------------------------------- 1. generation overhead
def bench_generation(model, mon, recs:list, n_new:int, batch_size:int, reps:int, update:dict)->dict:
    from weightwatch_nb.calibrate import encode, batches, truncate, context_window, _pad_id
    from weightwatch_nb.monitor import scan
    from weightwatch_nb.steer import Clip, ClipWeights
    tok, pad = model.tokenizer, _pad_id(model.tokenizer)
    encs = [encode(tok, r, generation_prompt=True) for r in recs]
    assert not truncate(encs, context_window(model), reserve=n_new), 'prompts too long: both modes must see the same tokens'
    gen = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=pad)
    def plain():
        with torch.no_grad():
            for b in batches(encs, batch_size, pad, 'left'):
                model.original_model.generate(input_ids=b.ids.to(DEVICE), attention_mask=b.mask.to(DEVICE), **gen)
    monitored = lambda: scan(model, mon, recs, generate=n_new, batch_size=batch_size, check=False, min_new_tokens=n_new)
    clipped = lambda: scan(model, mon, recs, generate=n_new, batch_size=batch_size, check=False, min_new_tokens=n_new, steer=Clip(mon))
    clip_w = lambda: scan(model, mon, recs, generate=n_new, batch_size=batch_size, check=False, min_new_tokens=n_new, steer=ClipWeights(mon, update))
    plain(); monitored(); clip_w()                         # warm-up
    modes = [('plain', plain), ('monitored', monitored), ('clip', clipped), ('clip_weights', clip_w)]
    w, c = {k: [] for k, _ in modes}, {k: [] for k, _ in modes}
    for r in range(reps):
        for k, f in modes[r % 4:] + modes[:r % 4]:             # rotate the order, so no mode always runs first
            a, b = timed(f); w[k].append(a); c[k].append(b)
    cpu, wall = {k: min(v) for k, v in c.items()}, {k: min(v) for k, v in w.items()}
    paired = lambda k: statistics.median(a / b for a, b in zip(w[k], w['plain']))   # each rep against the plain run of the same round
    return dict(cpu=cpu, wall=wall, ratio=cpu['monitored'] / cpu['plain'], ratio_clip=cpu['clip'] / cpu['plain'],
                ratio_clip_w=cpu['clip_weights'] / cpu['plain'], paired=paired('monitored'), paired_clip=paired('clip'),
                paired_clip_w=paired('clip_weights'), tokens=len(recs) * n_new, n_dirs=len(mon), raw=(w, c))

# ---------------------------------------------------------------- 2. calibration throughput
def reference_loop(model, dirs, recs:list)->int:
    "The reference code's design: one prompt at a time through HF with output_hidden_states, cosines per layer."
    from weightwatch_nb.calibrate import encode, direction_groups
    groups, tok, n = [(l, U.to(DEVICE)) for l, _, _, _, U in direction_groups(dirs)], model.tokenizer, 0   # on the device once
    with torch.no_grad():
        for r in recs:
            ids = torch.tensor([encode(tok, r).ids], device=DEVICE); n += ids.shape[1]
            hs = model.original_model(ids, output_hidden_states=True).hidden_states
            for l, U in groups:
                c = F.normalize(hs[l + 1][0].float(), dim=-1) @ U.T
                c.min(0).values, c.max(0).values
    return n

def bench_calibration(model, dirs, recs:list, batch_size:int, reps:int)->dict:
    from weightwatch_nb.calibrate import collect_stats, encode
    ntok = sum(len(encode(model.tokenizer, r)) for r in recs)
    from weightwatch_nb.calibrate import batches
    encs = [encode(model.tokenizer, r) for r in recs]
    bs = [(b.ids.to(DEVICE), b.mask.to(DEVICE)) for b in batches(encs, batch_size, 0)]
    runs = {'batched': lambda: collect_stats(model, dirs, recs, batch_size=batch_size),
            'per_example': lambda: collect_stats(model, dirs, recs, batch_size=1),
            'reference': lambda: reference_loop(model, dirs, recs),
            # the hardware's own ceiling: the bare HF forward pass, batched vs one prompt at a time, nothing monitored
            'raw_batched': lambda: [model.original_model(ids, attention_mask=mask) for ids, mask in bs],
            'raw_single': lambda: [model.original_model(torch.tensor([e.ids], device=DEVICE)) for e in encs]}
    for f in runs.values(): f()                            # warm-up (and a check that all run)
    w, c = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(reps):
        for k, f in runs.items():
            a, b = timed(f); w[k].append(a); c[k].append(b)
    tps, tps_wall = {k: ntok / min(v) for k, v in c.items()}, {k: ntok / min(v) for k, v in w.items()}
    return dict(tokens=ntok, prompts=len(recs), tps=tps, tps_wall=tps_wall, speedup_reference=tps['batched'] / tps['reference'],
                ceiling=tps['raw_batched'] / tps['raw_single'], ceiling_wall=tps_wall['raw_batched'] / tps_wall['raw_single'],
                speedup_per_example=tps['batched'] / tps['per_example'],
                wall_reference=tps_wall['batched'] / tps_wall['reference'], wall_per_example=tps_wall['batched'] / tps_wall['per_example'], raw=(w, c))

# ---------------------------------------------------------------- report
GEN_HEADER = ('| model | directions | new tokens | plain CPU s | monitored CPU s | monitored / plain | (wall) | clip CPU s | clip / plain | (wall) '
              '| clip (weights) CPU s | clip (weights) / plain | (wall) |\n|' + '---|' * 13)
CAL_HEADER = ('| model | threads | prompts / tokens | batched tok/s | reference loop tok/s | batched / reference | per-example tok/s '
              '| batched / per-example | ceiling |\n|' + '---|' * 9)
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true', help='small sizes, one repetition (a smoke test)')
    ap.add_argument('--out', default=None, help='markdown file to write the results to')
    ap.add_argument('--append', default=None, help='markdown file to append this run to, as a section of its own (keeps earlier runs and notes)')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (default 1: steadier timings on a shared machine)')
    ap.add_argument('--reps', type=int, default=7, help='repetitions per measurement (default 7)')
    ap.add_argument('--device', default='cpu', help="where the models run: cpu (default) or cuda")
    ap.add_argument('--kinds', nargs='+', choices=['zoo', 'wide', 'large', 'moe'], default=None,
                    help='models to measure (default: zoo, wide and moe; on a GPU also large)')
    args = ap.parse_args(argv)
    global DEVICE
    from weightwatch_nb.core import check_device
    DEVICE = check_device(args.device)
    if torch.device(DEVICE).type not in ('cpu', 'cuda'): sys.exit(f"--device {DEVICE}: the benchmark times cpu and cuda devices only")
    gpu = DEVICE != 'cpu'
    warnings.filterwarnings('ignore')
    from transformers.utils import logging; logging.disable_progress_bar(); logging.set_verbosity_error()
    torch.set_grad_enabled(False); torch.set_num_threads(args.threads)
    from weightwatch_nb.calibrate import calibrate
    q = args.quick
    n_cal, n_gen, n_new, reps = (32, 8, 8, 1) if q else (192, 32, 32, args.reps)
    lines, tmp = [], Path(tempfile.mkdtemp())
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} visible CPU cores (shared), torch {torch.__version__} "
           f"(generation on {torch.get_num_threads()} thread(s), calibration on 1 and on every core), float32, CPU; {datetime.datetime.now():%Y-%m-%d %H:%M}")
    if gpu:
        env = (f"{torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__}, {os.cpu_count()} CPU cores, float32, "
               f"transformers {__import__('transformers').__version__}; {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(env)
    rows_g, rows_c = [], []
    for kind in (args.kinds or (('zoo', 'wide', 'large', 'moe') if gpu and not q else ('zoo', 'wide', 'moe'))):
        if (got := setup(kind, tmp)) is None: print(f'\n== {kind}: skipped (its zoo organisms are not built)'); continue
        label, model, dirs, update = got
        print(f'\n== {label}: {len(dirs)} directions')
        mon = calibrate(model, dirs, prompts(64, seed=1), holdout=0.25)
        g = bench_generation(model, mon, prompts(n_gen, seed=2, lo=6, hi=16), n_new, batch_size=16, reps=reps, update=update)
        print(f"generation of {g['tokens']} tokens, CPU s: plain {g['cpu']['plain']:.2f}, monitored {g['cpu']['monitored']:.2f} (x{g['ratio']:.3f}; "
              f"wall paired x{g['paired']:.3f}), monitored+clip {g['cpu']['clip']:.2f} (x{g['ratio_clip']:.3f}; wall paired x{g['paired_clip']:.3f}), "
              f"monitored+clip (weights) {g['cpu']['clip_weights']:.2f} (x{g['ratio_clip_w']:.3f}; wall paired x{g['paired_clip_w']:.3f})")
        for th in ([torch.get_num_threads()] if gpu else sorted({args.threads, os.cpu_count() or 1})):    # one thread, and every core (what a user gets by default)
            torch.set_num_threads(th)
            c = bench_calibration(model, dirs, prompts(n_cal if kind == 'zoo' else n_cal // 2, seed=3), batch_size=32, reps=max(1, reps // 2))
            print(f"calibration, {th} thread(s), on {c['prompts']} prompts / {c['tokens']} tokens: batched {c['tps']['batched']:.0f} tok/s, "
                  f"reference loop {c['tps']['reference']:.0f} tok/s (x{c['speedup_reference']:.1f}), per-example collect_stats "
                  f"{c['tps']['per_example']:.0f} tok/s (x{c['speedup_per_example']:.1f}); wall-clock x{c['wall_reference']:.1f} / x{c['wall_per_example']:.1f}; "
                  f"bare HF forward batched / single x{c['ceiling']:.1f} (wall x{c['ceiling_wall']:.1f})")
            rows_c.append(f"| {label} | {th} | {c['prompts']} / {c['tokens']} | {c['tps_wall']['batched']:.0f} | {c['tps_wall']['reference']:.0f} | "
                          f"**{c['wall_reference']:.1f}×** ({c['speedup_reference']:.1f}×) | {c['tps_wall']['per_example']:.0f} | "
                          f"{c['wall_per_example']:.1f}× ({c['speedup_per_example']:.1f}×) | {c['ceiling_wall']:.1f}× ({c['ceiling']:.1f}×) |")
        torch.set_num_threads(args.threads)
        rows_g.append(f"| {label} | {g['n_dirs']} | {g['tokens']} | {g['cpu']['plain']:.2f} | {g['cpu']['monitored']:.2f} | **{g['ratio']:.3f}** "
                      f"| {g['paired']:.3f} | {g['cpu']['clip']:.2f} | {g['ratio_clip']:.3f} | {g['paired_clip']:.3f} "
                      f"| {g['cpu']['clip_weights']:.2f} | {g['ratio_clip_w']:.3f} | {g['paired_clip_w']:.3f} |")
    gpu_note = ('''
**On the GPU** every column headed "CPU s" holds wall-clock seconds between `torch.cuda.synchronize()` calls (the GPU's
work included), so the bracketed and unbracketed ratios are the same measurement; "threads" is torch's default.
''' if gpu else '')
    md = f"""# Monitoring benchmarks (`benchmarks/bench_monitor.py`)

Measured in one run{' (--quick)' if q else ''}: {env}.
{gpu_note}
## Monitored generation vs plain generation (goal ≤ 1.10)

{n_gen} prompts, batch 16, {n_new} new tokens each (greedy, `min_new_tokens` forces equal lengths), {reps} alternating
repetitions. Times are CPU seconds of the benchmark process (one torch thread), best of the repetitions: other jobs on
the shared machine do not inflate them the way they inflate wall-clock time. The wall-clock column is the median ratio of
adjacent runs, for comparison. Plain: `bridge.original_model.generate`, no hooks. Monitored: `scan(..., generate=N)`: cosines
with every direction at every layer in the generation's own forward passes, plus the reports. Clip: the same with clip
steering. Clip (weights): the same with `ClipWeights` (a rank-16 update at each of the blocks' matrices).

{GEN_HEADER}
{chr(10).join(rows_g)}

## Batched calibration vs a per-example loop (goal ≥ 5×)

Throughput in prompt tokens per wall-clock second (padding not counted), best of {max(1, reps // 2)} alternating
repetitions, with torch on one thread and on every core of the machine (torch's default, what a user gets); ratios
of CPU seconds of the benchmark process in brackets (with several threads these add up the threads' time, so they
hide what the extra cores buy). Batched: `collect_stats(batch_size=32)` (one tokenizer call, length-sorted batches,
stops at the last monitored layer). Reference design: one prompt at a time through the Hugging Face model with
`output_hidden_states=True`. Per-example: `collect_stats(batch_size=1)`. Ceiling: the bare Hugging Face forward pass
batched (same batches) over one prompt at a time, nothing monitored: what batching the model itself gains here.

{CAL_HEADER}
{chr(10).join(rows_c)}
"""
    if args.out: Path(args.out).write_text(md); print(f'\nwrote {args.out}')
    if args.append:
        with open(args.append, 'a') as f:
            f.write(f"\n\n## Run of {datetime.datetime.now():%Y-%m-%d %H:%M}{' (--quick)' if q else ''}, with clip (weights)\n\n{env}.\n\n"
                    f"{GEN_HEADER}\n{chr(10).join(rows_g)}\n\n{CAL_HEADER}\n{chr(10).join(rows_c)}\n")
        print(f'\nappended to {args.append}')
    return md

if __name__ == '__main__': main()
