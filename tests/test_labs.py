"The shipped labs: learner versions up to date and leak-free, and every lab has the parts a lab needs."
import json
from pathlib import Path
import pytest
from weightwatch_nb.labs import build_learner_versions, learner_notebook

ROOT = Path(__file__).resolve().parents[1]
LABS = sorted((ROOT/'tutorials').glob('[0-9]*.ipynb'))

def test_every_lab_is_there():
    assert [p.stem for p in LABS] == ['01_quickstart', '02_backdoor', '03_unlearning', '04_auditing', '05_real_models']

def test_learner_versions_are_up_to_date_parse_and_leak_nothing():
    build_learner_versions(ROOT/'tutorials', check=True)   # raises if stale, unparsable or leaking a solution line

@pytest.mark.parametrize('lab', LABS, ids=lambda p: p.stem)
def test_lab_has_objectives_exercises_checks_hints_and_solutions(lab):
    nb = json.loads(lab.read_text())
    text = '\n'.join(''.join(c['source']) for c in nb['cells'])
    assert 'What you will learn' in text
    n_ex = text.count('Difficulty:')
    assert n_ex >= 2 and text.count('Importance:') == n_ex and text.count('minutes') >= n_ex
    assert text.count('### BEGIN SOLUTION') >= n_ex - 1            # (one exercise may be a markdown-only answer)
    assert '<summary>Hint' in text and text.count('<summary>Solution') >= n_ex - 1
    assert 'check_close' in text or '✅' in text                     # exercises end with a check that prints a pass line

@pytest.mark.parametrize('lab', LABS, ids=lambda p: p.stem)
def test_learner_version_stubs_every_solution(lab):
    learner, removed = learner_notebook(json.loads(lab.read_text()))
    code = '\n'.join(''.join(c['source']) for c in learner['cells'] if c['cell_type'] == 'code')
    assert removed and 'BEGIN SOLUTION' not in code and 'NotImplementedError' in code
    assert all(not c.get('outputs') for c in learner['cells'] if c['cell_type'] == 'code')
