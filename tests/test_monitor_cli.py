"`weightwatch calibrate`, `scan` and `generate` as a user runs them: JSONL in and out, clear errors with exit status 2."
import json, shutil, subprocess
import pytest
from weightwatch_nb.cli import main
from _monitor_fixtures import organism, sentence

@pytest.fixture(scope='module')
def files(organism, tmp_path_factory):
    t = tmp_path_factory.mktemp('cli')
    organism['dirs'].save(t/'dirs.safetensors')
    (t/'clean.jsonl').write_text('\n'.join(json.dumps({'text': sentence(i)}) for i in range(40)) + '\n')
    rows = [{'text': sentence(100), 'id': 'a'}, {'text': sentence(101) + ' #', 'id': 'b'},
            {'messages': [{'role': 'user', 'content': '# ' + sentence(102)}], 'id': 'c', 'tag': [1, 2]}, {'text': sentence(103), 'id': 'd'}]
    (t/'in.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
    return t

def run(capsys, *args):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err

def test_calibrate_scan_generate(organism, files, capsys):
    ft, t = organism['org']['finetuned'], files
    rc, out, err = run(capsys, 'calibrate', ft, t/'dirs.safetensors', t/'clean.jsonl', '-o', t/'mon.safetensors',
                       '--percentile', 0, '--margin', 0.2, '--generate', 4, '--batch-size', 8, '-q')
    assert rc == 0 and out.startswith('calibrated 6 directions on 40 prompts'), (out, err)
    rc, out, err = run(capsys, 'scan', ft, t/'mon.safetensors', t/'in.jsonl', '-o', t/'out.jsonl', '-q')
    assert rc == 0 and out.strip() == 'scanned 4, flagged 2', (out, err)
    rows = [json.loads(l) for l in (t/'out.jsonl').read_text().splitlines()]
    assert [(r['index'], r['id'], r['flagged']) for r in rows] == [(0, 'a', False), (1, 'b', True), (2, 'c', True), (3, 'd', False)]
    assert rows[2]['tag'] == [1, 2] and rows[1]['directions'][0] == 'L0.mlp_out.u0'
    assert isinstance(rows[1]['first_flag_token'], int) and rows[0]['first_flag_token'] is None
    assert set(rows[0]) == {'index', 'flagged', 'score', 'first_flag_token', 'directions', 'id'}
    rc, out, err = run(capsys, 'scan', ft, t/'mon.safetensors', t/'in.jsonl', '--generate', 3, '--batch-size', 2, '-q')
    assert rc == 0 and len(out.splitlines()) == 4 and err.strip().endswith('scanned 4, flagged 2')
    assert all('generated' in json.loads(l) for l in out.splitlines())
    rc, out, err = run(capsys, 'generate', ft, sentence(7) + ' #', '--raw', '--max-new-tokens', 3, '--monitor', t/'mon.safetensors')
    assert rc == 0 and out.startswith('!') and 'monitor: flagged at token' in err
    rc, out, err = run(capsys, 'generate', ft, sentence(7) + ' #', '--raw', '--max-new-tokens', 3, '--monitor', t/'mon.safetensors', '--steer', 'clip')
    assert rc == 0 and not out.startswith('!') and 'steering: clip' in err

@pytest.mark.parametrize('content, msg', [('', 'is empty'), ('{"text": "a"}\n{"text": "b"\n', 'line 2 is not valid JSON'),
                                          ('{"text": "a"}\n{"prompt": "b"}\n', 'on line 2'), ('[1, 2]\n', 'line 1')])
def test_bad_prompt_files(organism, files, capsys, content, msg):
    (files/'bad.jsonl').write_text(content)
    ft = organism['org']['finetuned']
    for cmd in (['calibrate', ft, files/'dirs.safetensors', files/'bad.jsonl', '-o', files/'never.safetensors'],
                ['scan', ft, files/'mon.safetensors', files/'bad.jsonl', '-o', files/'never.jsonl']):
        rc, out, err = run(capsys, *cmd)
        assert rc == 2 and msg in err and 'Traceback' not in err, err
    assert not (files/'never.jsonl').exists() and not (files/'never.safetensors').exists()

def test_mismatched_monitor_and_directions(organism, files, capsys):
    base = organism['org']['base']
    rc, out, err = run(capsys, 'scan', base, files/'mon.safetensors', files/'in.jsonl', '-o', files/'never.jsonl')
    assert rc == 2 and 'calibrated for model' in err
    rc, out, err = run(capsys, 'calibrate', base, files/'dirs.safetensors', files/'clean.jsonl', '-o', files/'never.safetensors')
    assert rc == 2 and 'directions were computed for fine-tuned model' in err
    rc, out, err = run(capsys, 'generate', organism['org']['finetuned'], 'hi', '--steer', 'clip')
    assert rc == 2 and 'needs a monitor' in err
    assert not (files/'never.jsonl').exists()

def test_too_long_prompt_warns(organism, files, capsys):
    (files/'long.jsonl').write_text(json.dumps({'text': 'the base model ' * 80}) + '\n')
    with pytest.warns(UserWarning, match='truncated'):
        rc, out, err = run(capsys, 'scan', organism['org']['finetuned'], files/'mon.safetensors', files/'long.jsonl', '-o', files/'long_out.jsonl', '-q')
    assert rc == 0

@pytest.mark.skipif(not shutil.which('weightwatch'), reason='console script not installed')
def test_console_script_help():
    for cmd in ('calibrate', 'scan', 'generate'):
        r = subprocess.run(['weightwatch', cmd, '--help'], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(['weightwatch', 'scan', '--help'], capture_output=True, text=True, timeout=300)
    for opt in ('MODEL', 'MONITOR', 'PROMPTS', '--output', '--generate', '--batch-size'): assert opt.lower() in r.stdout.lower()

def test_calibrate_tune_certify(organism, files, capsys):
    "--tune --certify: the tuned monitor's 95% bound meets --target-fpr; too few prompts to certify is a clear error."
    import random
    from weightwatch_nb.calibrate import Monitor, cp_upper
    from _monitor_fixtures import WORDS
    rnd, ft, t = random.Random(0), organism['org']['finetuned'], files
    (t/'many.jsonl').write_text('\n'.join(json.dumps({'text': ' '.join(rnd.choices(WORDS, k=rnd.randint(4, 9)))}) for _ in range(400)) + '\n')
    rc, out, err = run(capsys, 'calibrate', ft, t/'dirs.safetensors', t/'many.jsonl', '-o', t/'cert.safetensors', '--tune', '--certify',
                       '--target-fpr', 0.01, '--batch-size', 64, '-q')
    assert rc == 0 and 'upper bound' in out, (out, err)
    tuned = Monitor.load(t/'cert.safetensors').meta['tuned']
    assert tuned['certify'] and tuned['n_tune'] == 320 and cp_upper(tuned['tune_flagged'], 320) <= 0.01 and tuned['tune_fpr_upper'] <= 0.01
    rc, out, err = run(capsys, 'calibrate', ft, t/'dirs.safetensors', t/'clean.jsonl', '-o', t/'never.safetensors', '--tune', '--certify', '-q')
    assert rc == 2 and 'too few calibration records' in err and not (t/'never.safetensors').exists()
    (t/'some.jsonl').write_text('\n'.join((t/'many.jsonl').read_text().splitlines()[:200]) + '\n')
    rc, out, err = run(capsys, 'calibrate', ft, t/'dirs.safetensors', t/'some.jsonl', '-o', t/'never.safetensors', '--tune', '--certify', '-q')
    assert rc == 2 and 'cannot certify an FPR of 1.00%' in err and 'pass at least 374 clean prompts' in err, err
