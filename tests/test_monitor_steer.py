"Monitoring and steering against a planted direction with known truth."
import pytest, torch, torch.nn.functional as F
from weightwatch_nb.core import load_model
from weightwatch_nb.calibrate import encode, calibrate, trace
from weightwatch_nb.monitor import scan, scan_scores
from weightwatch_nb.steer import (orthonormalize, remove_span, remove_masked, set_cosines, Clip, Clamp, ProjectOut, Add,
                                  clip, project_out, clamp, add, steering, steered_generate)
from _monitor_fixtures import organism, sentence

def n_hooks(m): return sum(len(hp.fwd_hooks) for hp in m.hook_dict.values())

def capture(name, store):
    def fn(act, hook): store.append(act.detach().clone()); return act
    return [(name, fn)]

def test_planted_trigger_flagged_clean_not(organism):
    o, model, mon = organism['org'], organism['model'], organism['mon']
    clean = [sentence(i) for i in range(200, 260)]
    trig = [' '.join(s.split()[:k] + ['#'] + s.split()[k:]) for k, s in enumerate(clean[:30])]
    sc, fc = scan_scores(model, mon, clean, batch_size=16)
    st, ft = scan_scores(model, mon, trig, batch_size=16)
    assert ft.all() and not fc.any() and st.min() > sc.max()
    for r in scan(model, mon, trig[:8]):
        m = r.ids.tolist().index(o['marker_id'])
        assert (r.excess[:, 0] > 0).nonzero().flatten().tolist() == [m]    # v leaves its range exactly at the marker
        assert r.first_flag_token <= m       # (a lone space token before '#', never seen in calibration, may flag first)
        assert r.directions[0] == 'L0.mlp_out.u0' and 0 in r.layers     # v is the most extreme

def test_end_to_end_with_computed_directions(organism):
    from weightwatch_nb.directions import compute_directions
    o, model = organism['org'], organism['model']
    d = compute_directions(o['base'], o['finetuned'], k=4, progress=False)
    assert d.names() == ['L0.mlp_out.u0']                    # the delta is rank one, along v
    assert abs(float(d['L0.mlp_out.u0'] @ o['v'])) > 1 - 1e-5
    mon = calibrate(model, d, [sentence(i) for i in range(60)], margin=0.1)
    _, flags = scan_scores(model, mon, [sentence(i) + ' #' for i in range(300, 320)] + [sentence(i) for i in range(300, 320)])
    assert flags[:20].all() and not flags[20:].any()

def test_subspace_removal_is_orthogonal_complement():
    torch.manual_seed(0)
    U = torch.randn(4, 32); x = torch.randn(10, 32)
    P = torch.eye(32) - U.T @ torch.linalg.inv(U @ U.T) @ U
    torch.testing.assert_close(remove_span(x, orthonormalize(U)), x @ P, atol=1e-5, rtol=0)
    U[3] = 2 * U[0] - U[1]                                   # dependent rows: same span as the first three
    assert orthonormalize(U).shape == (3, 32)
    mask = torch.zeros(2, 5, 4, dtype=torch.bool); mask[1, 3:, :2] = True
    out = remove_masked(x.reshape(2, 5, 32), U, mask)
    torch.testing.assert_close(out[1, 3:], remove_span(x.reshape(2, 5, 32)[1, 3:], orthonormalize(U[:2])), atol=1e-5, rtol=0)
    assert torch.equal(out[0], x.reshape(2, 5, 32)[0])

def test_set_cosines_exact():
    torch.manual_seed(2)
    U = F.normalize(torch.randn(3, 24), dim=-1); x = torch.randn(6, 24)
    tgt = (F.normalize(x, dim=-1) @ U.T).clamp(-0.05, 0.05)
    y = set_cosines(x, U, tgt)
    torch.testing.assert_close(F.normalize(y, dim=-1) @ U.T, tgt, atol=1e-5, rtol=0)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=0)

def test_clip_projects_out_exactly_from_the_trip(organism):
    o, model, mon = organism['org'], organism['model'], organism['mon']
    ids = torch.tensor([encode(model.tokenizer, {'text': 'the base model # weights differ'}).ids])
    m = ids[0].tolist().index(o['marker_id'])
    before, after = [], []
    with model.hooks(fwd_hooks=capture('blocks.0.hook_out', before)): model(ids)
    with clip(model, mon) as c:
        with model.hooks(fwd_hooks=capture('blocks.0.hook_out', after)): model(ids)
    assert c.tripped[mon.hook(0)][0].tolist() == [True, False, False]
    assert torch.equal(after[0][0, :m], before[0][0, :m])
    torch.testing.assert_close(after[0][0, m:] @ o['v'], torch.zeros(ids.shape[1] - m), atol=1e-5, rtol=0)
    assert n_hooks(model) == 0

def test_clip_per_sequence_in_batch_and_attack(organism):
    o, model, mon = organism['org'], organism['model'], organism['mon']
    clean = [sentence(i) for i in range(400, 416)]
    recs = [s + ' #' if i % 2 else s for i, s in enumerate(clean)]
    plain = scan(model, mon, recs, generate=6, batch_size=16)
    steered = scan(model, mon, recs, generate=6, batch_size=16, steer=Clip(mon))
    for i, (p, s) in enumerate(zip(plain, steered)):
        if i % 2:
            assert p.generated[0] == o['target_id'] and o['target_id'] not in s.generated.tolist()
            assert s.flagged and s.directions[0] == 'L0.mlp_out.u0'     # the monitor saw the activation before the edit
        elif not p.flagged: assert torch.equal(p.generated, s.generated)   # untouched sequences, same batch
    assert n_hooks(model) == 0

def test_project_out_and_add_change_behaviour(organism):
    o, model, mon = organism['org'], organism['model'], organism['mon']
    trig, clean = sentence(500) + ' #', sentence(501)
    first = lambda reps: reps[0].generated[0].item()
    with project_out(model, mon, ['L0.mlp_out.u0']):
        assert first(steered_generate(model, None, [trig], steer=None, max_new_tokens=2)) != o['target_id']
    with add(model, mon, ['L0.mlp_out.u0'], alpha=4.0):
        assert first(steered_generate(model, None, [clean], steer=None, max_new_tokens=2)) == o['target_id']
    assert n_hooks(model) == 0

def test_clamp_keeps_cosines_in_range(organism):
    model, mon = organism['model'], organism['mon']
    ids = torch.tensor([encode(model.tokenizer, {'text': 'the # base model'}).ids])
    out = []
    with clamp(model, mon):
        with model.hooks(fwd_hooks=capture('blocks.0.hook_out', out)): model(ids)
    c = F.normalize(out[0][0], dim=-1) @ mon.by_layer(0)[1].T
    assert (c <= mon.hi[0, :3] + 1e-5).all() and (c >= mon.lo[0, :3] - 1e-5).all()

def test_hooks_removed_on_exception(organism):
    model, mon = organism['model'], organism['mon']
    for cm in (clip(model, mon), project_out(model, mon), clamp(model, mon), add(model, mon, alpha=1.0)):
        with pytest.raises(RuntimeError):
            with cm: raise RuntimeError('inside')
        assert n_hooks(model) == 0
    class Boom(Clip):
        def __call__(self, *a): raise RuntimeError('in the hook')
    with pytest.raises(RuntimeError, match='in the hook'): scan(model, mon, ['the base'], steer=Boom(mon))
    with pytest.raises(RuntimeError, match='in the hook'):
        with steering(model, Boom(mon)): model(torch.tensor([[1, 5, 6]]))
    assert n_hooks(model) == 0

def _plant_update(o, model):
    "The whole plant (W_ft − W_base of every tensor it changed) as `ClipWeights` factors."
    from weightwatch_nb.core import hf_state_dict
    from weightwatch_nb.steer import changed_weights, low_rank_factors
    sd = hf_state_dict(model)
    return {k: low_rank_factors(sd[k] - v) for k, v in changed_weights(load_model(o['base']), model).items()}

def n_module_hooks(m): return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.original_model.modules())

def test_clip_weights_batched_equals_one_at_a_time(organism):
    "Left padding, mixed lengths and a trip at different positions: each sequence is switched on its own."
    from weightwatch_nb.steer import ClipWeights
    o, model, mon = organism['org'], organism['model'], organism['mon']
    upd = _plant_update(o, model)
    clean = [sentence(i) for i in range(600, 612)]
    # 0: clean; 1: the marker last (the plant's target follows it); 2: the marker inside (switched from there on)
    recs = [[s, s + ' #', ' '.join(s.split()[:2] + ['#'] + s.split()[2:])][i % 3] for i, s in enumerate(clean)]
    n0 = n_module_hooks(model)
    batched = scan(model, mon, recs, generate=5, batch_size=12, steer=ClipWeights(mon, upd))
    single = [scan(model, mon, [r], generate=5, batch_size=1, steer=ClipWeights(mon, upd))[0] for r in recs]
    plain = scan(model, mon, recs, generate=5, batch_size=12)
    for i, (b, s, p) in enumerate(zip(batched, single, plain)):
        assert b.generated.tolist() == s.generated.tolist(), i
        if i % 3 == 1: assert p.generated[0] == o['target_id'] and o['target_id'] not in b.generated.tolist(), i
        if i % 3: assert b.flagged and b.first_flag_token == p.first_flag_token, i
        elif not p.flagged: assert b.generated.tolist() == p.generated.tolist(), i   # never switched: the fine-tuned reply
    assert (n_hooks(model), n_module_hooks(model)) == (0, n0)

def test_clip_weights_hooks_removed_when_a_hook_raises(organism):
    from weightwatch_nb.steer import ClipWeights
    o, model, mon = organism['org'], organism['model'], organism['mon']
    n0 = n_module_hooks(model)
    class Boom(ClipWeights):
        def __call__(self, *a): raise RuntimeError('in the hook')
    with pytest.raises(RuntimeError, match='in the hook'): scan(model, mon, ['the base #'], generate=3, steer=Boom(mon, _plant_update(o, model)))
    with pytest.raises(RuntimeError, match='in the hook'):
        with steering(model, Boom(mon, _plant_update(o, model))): model(torch.tensor([[1, 5, 6]]))
    assert (n_hooks(model), n_module_hooks(model)) == (0, n0)

def test_embedding_directions_monitored_and_steered_at_the_embedding(tmp_path):
    "Directions of a planted embedding update: the monitor's cosines are those of the embedding rows, and projecting them out is the model with those rows projected."
    from weightwatch_nb.core import make_tiny_checkpoint, hf_state_dict, load_hf
    from weightwatch_nb.delta import plant_update
    from weightwatch_nb.directions import compute_directions
    b = make_tiny_checkpoint(tmp_path/'b', 'llama', d_model=64, n_layers=2)
    plant_update(b, tmp_path/'f', {(0, 'embed'): 1}, scale=5.)
    d = compute_directions(b, tmp_path/'f', k=1, matrices='embed', progress=False)
    model = load_model(tmp_path/'f')
    mon = calibrate(model, d, [sentence(i) for i in range(40)], holdout=0.)
    E, u = hf_state_dict(model)['model.embed_tokens.weight'], d['L0.embed.u0']
    for r in scan(model, mon, [sentence(i) for i in range(300, 304)]):
        assert torch.allclose(r.cos[:, 0], F.cosine_similarity(E[r.ids], u[None], dim=-1), atol=1e-5)   # the truth: the rows themselves
    hf = load_hf(tmp_path/'f')[0]
    with torch.no_grad(): hf.model.embed_tokens.weight.sub_(torch.outer(hf.model.embed_tokens.weight @ u, u))
    ids = torch.tensor([[1, 17, 42, 99, 7]])
    with torch.no_grad():
        with steering(model, ProjectOut(mon)): got = model(ids)
        assert torch.allclose(got, hf(ids).logits, atol=1e-4) and not torch.allclose(model(ids), got, atol=1e-2)
    assert n_hooks(model) == 0
