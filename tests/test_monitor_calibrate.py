"Calibration against known truth: role masks, padding, shard merging, thresholds, bounds, the monitor artifact."
import json, math, warnings
import pytest, torch
from weightwatch_nb.core import WeightwatchError, load_model, make_tiny_checkpoint, tiny_tokenizer
from weightwatch_nb.calibrate import (encode, response_spans, RESPONSE, collect_stats, merge_stats, thresholds, record_scores, FLOAT_TOL,
                                      cp_upper, prompts_needed, Monitor, trace, read_jsonl, calibrate)
from _monitor_fixtures import organism, sentence

CONV = [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'the base'},
        {'role': 'assistant', 'content': 'a model'}, {'role': 'user', 'content': 'weights'}, {'role': 'assistant', 'content': 'differ'}]

def _resp_text(tok, e): return tok.decode([t for t, r in zip(e.ids, e.roles) if r == RESPONSE])

def test_roles_tiny_template():
    tok = tiny_tokenizer()
    e = encode(tok, {'messages': CONV})
    assert _resp_text(tok, e) == 'a model<|end|>differ<|end|>'
    assert e.ids[0] == tok.bos_token_id and e.roles[0] == 0
    assert sum(encode(tok, {'text': 'a model'}).roles) == 0

@pytest.mark.parametrize('template, want', [
    # ChatML (Qwen-style): newlines and headers around the content; the newline after <|im_end|> is the template's, not the reply's
    ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", 'a model<|im_end|>differ<|im_end|>'),
    # Llama-3 style, BOS rendered by the template itself
    ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
     "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}", 'a model<|eot_id|>differ<|eot_id|>'),
])
def test_roles_other_templates(template, want):
    tok = tiny_tokenizer()
    tok.add_special_tokens({'additional_special_tokens': ['<|im_start|>', '<|im_end|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']})
    tok.chat_template = template
    e = encode(tok, {'messages': CONV})
    assert _resp_text(tok, e) == want
    assert e.ids.count(tok.bos_token_id) == 1                     # never a doubled BOS
    g = encode(tok, {'messages': CONV[:2]}, generation_prompt=True)
    assert sum(g.roles) == 0 and tok.decode(g.ids).endswith('assistant\n' if 'im_start' in template else 'assistant<|end_header_id|>\n\n')

def test_no_chat_template_is_clear():
    tok = tiny_tokenizer(); tok.chat_template = None
    with pytest.raises(WeightwatchError, match='no chat template'): encode(tok, {'messages': CONV})

@pytest.mark.parametrize('arch', ['llama', 'gpt2'])
def test_batched_equals_single(tmp_path, arch):
    model = load_model(make_tiny_checkpoint(tmp_path/arch, arch=arch))
    from weightwatch_nb.directions import Directions
    dirs = Directions.from_vectors({(0, 'mlp_out'): torch.randn(2, 64), (1, 'attn_out'): torch.randn(2, 64)})
    recs = ['the base model differ', 'a', {'messages': CONV}, 'weights of the fine tuned model']
    for gen in (0, 4):
        one, many = trace(model, dirs, recs, batch_size=1, generate=gen), trace(model, dirs, recs, batch_size=3, generate=gen)
        for a, b in zip(one, many):
            assert torch.equal(a.ids, b.ids) and torch.equal(a.generated, b.generated)
            torch.testing.assert_close(a.cos, b.cos, atol=1e-4, rtol=0)

def test_shards_merge_exactly(organism):
    model, dirs = organism['model'], organism['dirs']
    recs = [sentence(i) for i in range(30)]
    whole = collect_stats(model, dirs, recs, batch_size=7, generate=3)
    parts = merge_stats([collect_stats(model, dirs, recs[:11], batch_size=2, generate=3), collect_stats(model, dirs, recs[11:], batch_size=5, generate=3)])
    torch.testing.assert_close(parts.mins, whole.mins, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts.maxs, whole.maxs, atol=1e-5, rtol=0)
    assert torch.equal(parts.counts, whole.counts)
    a, b = Monitor.from_stats(whole, dirs, holdout=0.2), Monitor.from_stats(parts, dirs, holdout=0.2)
    torch.testing.assert_close(a.lo, b.lo, atol=1e-5, rtol=0); assert a.meta['heldout_flagged'] == b.meta['heldout_flagged']

def test_merge_refuses_other_model(organism, tmp_path):
    st = collect_stats(organism['model'], organism['dirs'], ['a b'] * 3)
    other = collect_stats(load_model(organism['org']['base']), organism['dirs'], ['a b'] * 3)
    with pytest.raises(WeightwatchError, match='same fine-tuned model'): merge_stats([st, other])

def test_thresholds_percentile_and_margin():
    mins = torch.arange(100.).reshape(100, 1) / 100 - 1     # -1.00 .. -0.01
    maxs = torch.arange(100.).reshape(100, 1) / 100          #  0.00 ..  0.99
    lo, hi = thresholds(mins, maxs)                           # without a margin: the range, widened by FLOAT_TOL on each side
    assert lo.item() == pytest.approx(-1 - FLOAT_TOL, abs=1e-7) and hi.item() == pytest.approx(0.99 + FLOAT_TOL, abs=1e-7)
    lo, hi = thresholds(mins, maxs, percentile=10)
    assert lo.item() == pytest.approx(-0.901 - FLOAT_TOL, abs=1e-7) and hi.item() == pytest.approx(0.891 + FLOAT_TOL, abs=1e-7)
    lo2, hi2 = thresholds(mins, maxs, percentile=10, margin=0.25)
    assert (hi2 - lo2).item() == pytest.approx(1.5 * (0.891 + 0.901), abs=1e-5)   # a margin beyond FLOAT_TOL replaces it

def test_rethreshold_without_model(organism):
    mon = organism['mon']
    tight = mon.rethreshold(percentile=10, margin=0)
    assert (tight.hi <= mon.hi).all() and (tight.lo >= mon.lo).all()
    held = mon.heldout
    k = int((record_scores(tight.stats, tight.lo, tight.hi)[held] > 0).sum())
    assert tight.meta['heldout_flagged'] == k > 0              # trimming flags some held-out clean prompts

def test_clopper_pearson():
    assert cp_upper(0, 10) == pytest.approx(1 - 0.05 ** 0.1)
    assert cp_upper(3, 50) == pytest.approx(0.1478, abs=5e-4)  # scipy.stats.beta.ppf(0.95, 4, 47)
    assert cp_upper(10, 10) == 1.0
    n = prompts_needed(0.02)
    assert cp_upper(0, n) <= 0.02 < cp_upper(0, n - 1)

def test_too_few_prompts_warns(organism):
    with pytest.warns(UserWarning, match='too few calibration prompts'):
        Monitor.from_stats(organism['mon'].stats, organism['dirs'], target_fpr=0.001)

def test_monitor_roundtrip_and_validation(organism, tmp_path):
    mon, model, dirs = organism['mon'], organism['model'], organism['dirs']
    p = mon.save(tmp_path/'m.safetensors')
    m2 = Monitor.load(p, model=model, dirs=dirs)
    assert m2.names == mon.names and torch.equal(m2.hi, mon.hi) and m2.meta == mon.meta
    from safetensors import safe_open
    with safe_open(str(p), 'pt') as f: md = f.metadata()
    assert md['format'] == 'weightwatch-monitor' and md['schema_version'] == '1' and int(md['n_calibration']) == 80
    assert json.loads(md['meta'])['fingerprints']['model']['sha256'] == organism['mon'].meta['fingerprints']['model']['sha256']
    with pytest.raises(WeightwatchError, match='calibrated for model'): Monitor.load(p, model=load_model(organism['org']['base']))
    with pytest.raises(WeightwatchError, match='other directions'): Monitor.load(p, dirs=dirs.select(dirs.names()[:2]))
    (tmp_path/'x.safetensors').write_text('nope')
    with pytest.raises(WeightwatchError, match='not a valid monitor file'): Monitor.load(tmp_path/'x.safetensors')

def test_calibrate_refuses_other_models_directions(organism):
    base = load_model(organism['org']['base'])
    with pytest.raises(WeightwatchError, match='directions were computed for fine-tuned model'):
        calibrate(base, organism['dirs'], ['a b c'] * 4)

def test_long_prompt_truncated_with_warning(organism):
    with pytest.warns(UserWarning, match='truncated'):
        t = trace(organism['model'], organism['dirs'], ['the base model ' * 80])[0]
    assert len(t.ids) == 128

def test_read_jsonl_errors(tmp_path):
    f = tmp_path/'p.jsonl'
    f.write_text('{"text": "a"}\n{"text": "b",}\n')
    with pytest.raises(WeightwatchError, match='line 2'): read_jsonl(f)
    f.write_text('{"prompt": "a"}\n')
    with pytest.raises(WeightwatchError, match='line 1'): read_jsonl(f)
    f.write_text('   \n')
    with pytest.raises(WeightwatchError, match='empty'): read_jsonl(f)
