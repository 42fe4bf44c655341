"""The same method on a GPU: results against the planted truth and against the CPU run of the same inputs.

Skipped on machines without CUDA (CI has none). Run on a GPU machine with `pytest tests/test_gpu.py`; set
`WW_TEST_DEVICE` to test another device (`WW_TEST_DEVICE=cpu` runs the comparisons CPU against CPU, a check of the
tests themselves).
"""
import json, os
import pytest, torch
from weightwatch_nb.core import load_model, fingerprint, make_planted_checkpoint
from weightwatch_nb.calibrate import calibrate, Monitor
from weightwatch_nb.directions import compute_directions
from weightwatch_nb.monitor import scan, scan_scores
from weightwatch_nb.steer import Clip, clip
from weightwatch_nb.cli import main
from _monitor_fixtures import sentence

DEV = os.environ.get('WW_TEST_DEVICE') or ('cuda' if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEV is None, reason='no CUDA GPU (set WW_TEST_DEVICE to test another device)')

def n_hooks(m): return sum(len(hp.fwd_hooks) for hp in m.hook_dict.values())
def trig(i): s = sentence(i).split(); k = i % len(s); return ' '.join(s[:k] + ['#'] + s[k:])   # the marker anywhere: flagged
def attack(i): return sentence(i) + ' #'   # the marker last: the planted model then emits its target token

@pytest.fixture(scope='module')
def planted(tmp_path_factory):
    org = make_planted_checkpoint(tmp_path_factory.mktemp('planted_gpu'))
    dirs = compute_directions(org['base'], org['finetuned'], k=4, progress=False)
    cpu, dev = load_model(org['finetuned']), load_model(org['finetuned'], device=DEV)
    clean = [sentence(i) for i in range(80)]
    mons = {d: calibrate(m, dirs, clean, generate=6, margin=0.1, holdout=0.25) for d, m in (('cpu', cpu), ('dev', dev))}
    return dict(org=org, dirs=dirs, cpu=cpu, dev=dev, mons=mons)

def test_model_on_device_same_fingerprint(planted):
    assert str(planted['dev'].cfg.device).startswith(DEV)
    assert next(planted['dev'].original_model.parameters()).device.type == torch.device(DEV).type
    assert fingerprint(planted['dev']) == fingerprint(planted['cpu'])    # an artifact made on one device is valid on the other

def test_calibration_on_device_matches_cpu(planted, tmp_path):
    a, b = planted['mons']['dev'], planted['mons']['cpu']
    torch.testing.assert_close(a.lo, b.lo, atol=1e-4, rtol=0); torch.testing.assert_close(a.hi, b.hi, atol=1e-4, rtol=0)
    a.save(tmp_path/'mon.safetensors')
    m = Monitor.load(tmp_path/'mon.safetensors')              # saved from the GPU run, loaded and checked against the CPU model
    m.check(planted['cpu'])
    assert m.lo.device.type == 'cpu'

def test_monitoring_on_device_against_truth_and_cpu(planted):
    o, dev, cpu, mon = planted['org'], planted['dev'], planted['cpu'], planted['mons']['dev']
    clean, trigd = [sentence(i) for i in range(200, 240)], [trig(i) for i in range(200, 240)]
    sc, fc = scan_scores(dev, mon, clean, batch_size=16)
    st, ft = scan_scores(dev, mon, trigd, batch_size=16)
    assert ft.all() and not fc.any() and st.min() > sc.max()
    atk = [attack(i) for i in range(200, 216)]
    reps = scan(dev, mon, atk, generate=4, batch_size=8)
    ref = scan(cpu, mon, atk, generate=4, batch_size=8)
    for r, c in zip(reps, ref):
        m = r.ids.tolist().index(o['marker_id'])
        assert r.flagged and r.first_flag_token <= m and r.directions[0] == 'L0.mlp_out.u0'
        assert r.generated[0] == o['target_id']                 # the planted behaviour runs on the GPU too
        assert torch.equal(r.generated.cpu(), c.generated.cpu()) and r.first_flag_token == c.first_flag_token
        torch.testing.assert_close(r.excess.cpu(), c.excess.cpu(), atol=1e-3, rtol=0)

def test_clip_on_device(planted):
    o, dev, mon = planted['org'], planted['dev'], planted['mons']['dev']
    trigd, clean = [attack(i) for i in range(300, 316)], [sentence(i) for i in range(300, 316)]
    steered = scan(dev, mon, trigd + clean, generate=4, batch_size=16, steer=Clip(mon))
    plain = scan(dev, mon, clean, generate=4, batch_size=16)
    assert all(p.generated[0] == o['target_id'] for p in scan(dev, mon, trigd, generate=4, batch_size=16))   # the attack works unsteered
    assert all(o['target_id'] not in s.generated.tolist() for s in steered[:16])
    assert all(torch.equal(s.generated, p.generated) for s, p in zip(steered[16:], plain))   # clean rows untouched
    with pytest.raises(RuntimeError, match='inside'):
        with clip(dev, mon): raise RuntimeError('inside')
    assert n_hooks(dev) == 0

def test_bfloat16_on_device(planted):
    o, dirs = planted['org'], planted['dirs']
    m = load_model(o['finetuned'], dtype=torch.bfloat16, device=DEV)
    mon = calibrate(m, dirs, [sentence(i) for i in range(80)], margin=0.1, holdout=0.25)
    _, fc = scan_scores(m, mon, [sentence(i) for i in range(400, 430)])
    _, ft = scan_scores(m, mon, [trig(i) for i in range(400, 430)])
    assert ft.all() and not fc.any()

def test_cli_on_device(planted, tmp_path, capsys):
    o, t = planted['org'], tmp_path
    planted['dirs'].save(t/'dirs.safetensors')
    (t/'clean.jsonl').write_text('\n'.join(json.dumps({'text': sentence(i)}) for i in range(40)) + '\n')
    (t/'in.jsonl').write_text('\n'.join(json.dumps({'text': s}) for s in [sentence(500), trig(501), sentence(502), attack(503)]) + '\n')
    out = {}
    for d in ('cpu', DEV):
        assert main(['calibrate', str(o['finetuned']), str(t/'dirs.safetensors'), str(t/'clean.jsonl'), '-o', str(t/f'mon_{d}.safetensors'),
                     '--generate', '3', '--device', d, '-q']) == 0
        assert main(['scan', str(o['finetuned']), str(t/f'mon_{d}.safetensors'), str(t/'in.jsonl'), '-o', str(t/f'out_{d}.jsonl'),
                     '--generate', '3', '--device', d, '-q']) == 0
        out[d] = [json.loads(l) for l in (t/f'out_{d}.jsonl').read_text().splitlines()]
    assert [r['flagged'] for r in out[DEV]] == [False, True, False, True]
    assert [(r['flagged'], r['first_flag_token'], r['directions']) for r in out[DEV]] == \
           [(r['flagged'], r['first_flag_token'], r['directions']) for r in out['cpu']]
    capsys.readouterr()

def test_steerers_on_device_against_truth_and_cpu(planted):
    "Clip at a prompt and at decoding steps (a direction trips, then nothing new), Clamp, ProjectOut and Add, on synthetic activations."
    from weightwatch_nb.steer import Clamp, ProjectOut, Add, remove_masked
    from _monitor_fixtures import planted_dirs
    import torch.nn.functional as F
    cpu = planted['cpu']
    mon = calibrate(cpu, planted_dirs(planted['org'], cpu), [sentence(i) for i in range(60)], margin=0.1)
    h0, U0 = mon.hook(0), mon.by_layer(0)[1]                          # three directions at layer 0
    g = torch.Generator().manual_seed(0)
    acts, cos = torch.randn(3, 4, 128, generator=g), torch.zeros(3, 4, 3)
    cos[1, 2, 0] = 9.; cos[2, 0, 1] = -9.                             # prompt: sequence 1 trips u0 at token 2, sequence 2 trips u1 at token 0
    a1, c1 = torch.randn(3, 1, 128, generator=g), torch.zeros(3, 1, 3); c1[0, 0, 2] = 9.   # a decoding step: sequence 0 trips u2
    ones, r0, r1 = torch.ones(3, 4, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 1, dtype=torch.long)
    def run(dev):
        d = lambda t: t.to(dev)
        cl = Clip(mon)
        out = [cl(h0, d(acts), d(cos), d(ones), d(r0), 0), cl(h0, d(a1), d(c1), d(ones[:, :1]), d(r1), 1),
               cl(h0, d(a1), d(torch.zeros(3, 1, 3)), d(ones[:, :1]), d(r1), 2)]
        trip = cl.tripped[h0].cpu()
        out.append(Clamp(mon)(h0, d(acts), F.normalize(d(acts), dim=-1) @ d(U0).T, d(ones), d(r0), 0))
        out += [ProjectOut(mon)(h0, d(acts), None, d(ones), d(r0), 0), Add(mon, alpha=2.)(h0, d(acts), None, d(ones), d(r0), 0)]
        assert all(o.device.type == torch.device(dev).type for o in out)
        return [o.cpu() for o in out], trip
    (dv, dtrip), (cv, ctrip) = run(DEV), run('cpu')
    assert dtrip.tolist() == ctrip.tolist() == [[False, False, True], [True, False, False], [False, True, False]]
    for a, b in zip(dv, cv): torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    want = remove_masked(a1, U0, dtrip[:, None])                      # the truth: each sequence's tripped span removed
    torch.testing.assert_close(dv[1], want, atol=1e-4, rtol=0); torch.testing.assert_close(dv[2], want, atol=1e-4, rtol=0)
    c = F.normalize(dv[3], dim=-1) @ U0.T
    assert (c <= mon.hi[0, :3] + 1e-4).all() and (c >= mon.lo[0, :3] - 1e-4).all()
    assert (dv[4] @ U0.T).abs().max() < 1e-4                          # projected out: orthogonal to every direction
    torch.testing.assert_close(dv[5], acts + 2 * U0.sum(0), atol=1e-5, rtol=0)

def test_clip_weights_on_device_against_truth_and_cpu(planted):
    "ClipWeights with the whole plant as its update: the attack stops, clean rows keep their replies, and the device agrees with the CPU."
    from weightwatch_nb.core import hf_state_dict
    from weightwatch_nb.steer import ClipWeights, changed_weights, low_rank_factors
    o, dev, cpu = planted['org'], planted['dev'], planted['cpu']
    sd = hf_state_dict(cpu)
    upd = {k: low_rank_factors(sd[k] - v) for k, v in changed_weights(load_model(o['base']), cpu).items()}   # made on the CPU
    recs = [attack(i) for i in range(600, 608)] + [sentence(i) for i in range(600, 608)]
    n0 = sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in dev.original_model.modules())
    out = {d: scan(m, planted['mons'][d], recs, generate=4, batch_size=16, steer=ClipWeights(planted['mons'][d], upd))
           for d, m in (('dev', dev), ('cpu', cpu))}
    plain = scan(dev, planted['mons']['dev'], recs, generate=4, batch_size=16)
    assert all(p.generated[0] == o['target_id'] for p in plain[:8])                  # the attack works unsteered
    assert all(o['target_id'] not in r.generated.tolist() for r in out['dev'][:8])
    assert all(torch.equal(r.generated.cpu(), p.generated.cpu()) for r, p in zip(out['dev'][8:], plain[8:]) if not p.flagged)
    assert [r.generated.tolist() for r in out['dev']] == [r.generated.tolist() for r in out['cpu']]
    assert sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in dev.original_model.modules()) == n0

def test_directions_on_device_match_cpu(planted, tmp_path):
    org = planted['org']
    for meth in ('exact', 'randomized'):
        c = compute_directions(org['base'], org['finetuned'], k=4, method=meth, progress=False)
        g = compute_directions(org['base'], org['finetuned'], k=4, method=meth, device=DEV, progress=False)
        assert g.names() == c.names() and g.meta['fingerprints'] == c.meta['fingerprints']
        for key, v in g.vectors.items():
            assert v.device.type == 'cpu'
            torch.testing.assert_close(g.S[key], c.S[key], atol=1e-4, rtol=1e-4)
            # the same subspace (signs are fixed; a randomized start differs between devices, so compare spans)
            cos = torch.linalg.svdvals(v.double() @ c.vectors[key].double().T)
            assert cos.min() > 0.999, (meth, key, cos)
    assert main(['directions', str(org['base']), str(org['finetuned']), '-o', str(tmp_path/'d.safetensors'), '--k', '2', '--device', DEV, '--quiet']) == 0

@pytest.fixture(scope='module')
def moe(tmp_path_factory):
    "A 16-expert Mixtral pair (top-2) with updates planted in its experts, on the device and on the CPU."
    import transformers as T
    from weightwatch_nb.core import tiny_tokenizer
    from weightwatch_nb.delta import plant_update
    t = tmp_path_factory.mktemp('moe_gpu')
    torch.manual_seed(0)
    cfg = T.AutoConfig.for_model('mixtral', vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, max_position_embeddings=128, num_local_experts=16, num_experts_per_tok=2,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(t/'base'); tiny_tokenizer(300).save_pretrained(t/'base')
    plant_update(t/'base', t/'ft', {(1, 'mlp_out'): 2, (1, 'mlp_in'): 1, (0, 'mlp_out'): 1, (1, 'mlp_router'): 1}, scale=3.)
    dirs = compute_directions(t/'base', t/'ft', k=2, progress=False)
    models = {'cpu': load_model(t/'ft'), 'dev': load_model(t/'ft', device=DEV)}
    mons = {d: calibrate(m, dirs, [f'text {i} of the test' for i in range(20)], holdout=0.) for d, m in models.items()}
    return dict(base=t/'base', ft=t/'ft', models=models, mons=mons)

@pytest.mark.parametrize('how', [dict(), dict(in_place=False), dict(cache=True)])
def test_clip_weights_moe_on_device(moe, how):
    "ClipWeights on fused experts and a router, every token switched (in place on decoding steps, on copies, or kept copies): the device generates what the edited weights generate, as the CPU does, and leaves the weights as they were."
    from weightwatch_nb.core import hf_state_dict
    from weightwatch_nb.edit import removed_update, removed_weights
    from weightwatch_nb.steer import swapped_weights, ClipWeights, _AllOn as AllOn
    recs = ['the text 3 of the test', 'of of the 7', 'text text text']
    got = {}
    for d, m in moe['models'].items():
        upd = removed_update(moe['base'], moe['ft'], 2, like=m, progress=False)
        assert {str(A.device) for A, _ in upd.values()} == {str(next(m.original_model.parameters()).device)}
        before = {k: v.clone() for k, v in hf_state_dict(m).items()}
        wrote, real = [], ClipWeights._write_edited   # (one sequence per pass: a decoding step routes to 2 of 16 experts, so the default edits them in place)
        ClipWeights._write_edited = lambda self, mod, parts, used, saved: wrote.append(len(used)) or real(self, mod, parts, used, saved)
        try: steered = scan(m, moe['mons'][d], recs, generate=6, batch_size=1, steer=AllOn(moe['mons'][d], upd, **how))
        finally: ClipWeights._write_edited = real
        assert bool(wrote) == (how == {}) and set(wrote) <= {1, 2}, (how, wrote)
        with swapped_weights(m, removed_weights(moe['base'], moe['ft'], 2, like=m, progress=False)):
            want = scan(m, moe['mons'][d], recs, generate=6, check=False)
        assert [r.generated.tolist() for r in steered] == [r.generated.tolist() for r in want], d
        assert all(torch.equal(v, before[k]) for k, v in hf_state_dict(m).items())        # put back
        got[d] = [r.generated.tolist() for r in steered]
    assert got['dev'] == got['cpu']
    m = moe['models']['dev']
    ids = m.tokenizer(recs[0], return_tensors='pt').input_ids.to(DEV)
    with torch.no_grad(), swapped_weights(m, removed_weights(moe['base'], moe['ft'], 2, like=m, progress=False)): edited = m(ids)
    with torch.no_grad(): assert (m(ids) - edited).abs().max() > 1e-2   # the plant matters: the steered run is not the plain one
